"""The recipe: three layers (model definition, inference algorithm, user parameters) and a target.

These models are the single source of truth: `recipe.schema.json` is generated
from them (`python -m telefuser.schema`), and cross-field rules live in their
validators.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal, Optional

from pydantic import Field, PositiveInt, field_validator, model_validator

from .base import StrictModel
from .enums import (
    AspectRatio,
    AttnImplType,
    CompileBackend,
    CompileMode,
    FeatureCacheMethod,
    ModelClass,
    ModelRole,
    PipelineType,
    QuantType,
    Resolution,
    SampleSolver,
    TargetDevice,
    TorchDtype,
    WeightDtype,
    WeightOffloadType,
)
from .step_list import check_step_list

# ---------------------------------------------------------------- target


class Target(StrictModel):
    """Where the plan will run. `auto` describes this machine at compile time."""

    device: TargetDevice = Field(TargetDevice.AUTO, description="cpu, cuda, or auto (this machine).")
    gpu: Optional[str] = Field(
        None, description="GPU preset (H100, H200, A100, L40S, RTX4090, B200) filling capability and memory."
    )
    compute_capability: Optional[str] = Field(
        None, pattern=r"^\d+\.\d+$", description="CUDA compute capability, e.g. '9.0'."
    )
    memory_gib: Optional[float] = Field(None, gt=0, description="Memory per device in GiB.")
    num_devices: PositiveInt = Field(1, description="Devices (ranks) the plan runs on.")
    packages: Optional[list[str]] = Field(
        None, description="Packages installed on the target (e.g. flash_attn_interface); default: this machine's."
    )


# ---------------------------------------------------------------- layer 1


class DeclaredAttributes(StrictModel):
    """Weight-bound attributes the recipe asserts; the compiler checks them against the files."""

    distill: Optional[bool] = Field(None, description="Step/CFG-distilled weights.")
    fp8: Optional[bool] = Field(None, description="Weights stored in float8.")
    meanflow: Optional[bool] = Field(None, description="MeanFlow weights (two time inputs).")


class ModelSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Unique name within the recipe.")
    role: ModelRole
    path: str = Field(min_length=1, description="Weight file, sharded index, or folder; ${VAR} expanded.")
    class_: ModelClass = Field(ModelClass.AUTO, alias="class", description="Registry class; auto = detect.")
    dtype: WeightDtype = Field(WeightDtype.AUTO, description="Expected storage dtype; auto = read from file.")
    attributes: DeclaredAttributes = Field(default_factory=DeclaredAttributes)
    arch: dict[str, Any] = Field(
        default_factory=dict, description="Architecture numbers the recipe asserts (dim, num_layers, ...)."
    )


class Layer1(StrictModel):
    """Model definition bound to weights: never changes after loading."""

    pipeline: PipelineType = PipelineType.WAN_T2V
    torch_dtype: TorchDtype = Field(TorchDtype.BFLOAT16, description="Compute dtype.")
    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names_and_roles(self) -> "Layer1":
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        roles = [m.role for m in self.models]
        dup_roles = sorted({r for r in roles if roles.count(r) > 1})
        if dup_roles:
            raise ValueError(f"each role may appear once; repeated: {', '.join(dup_roles)}")
        has_single = ModelRole.DIT.value in roles
        has_moe = {ModelRole.DIT_HIGH_NOISE.value, ModelRole.DIT_LOW_NOISE.value} & set(roles)
        if has_single and has_moe:
            raise ValueError("use either role 'dit' or the MoE pair 'dit_high_noise' + 'dit_low_noise', not both")
        if has_moe and len(has_moe) != 2:
            raise ValueError("an MoE pipeline needs both 'dit_high_noise' and 'dit_low_noise'")
        if not has_single and not has_moe:
            raise ValueError("layer1.models needs a diffusion transformer (role 'dit' or the MoE pair)")
        for required in (ModelRole.VAE, ModelRole.TEXT_ENCODER, ModelRole.TOKENIZER):
            if required.value not in roles:
                raise ValueError(f"layer1.models needs a model with role '{required.value}'")
        return self

    @property
    def is_moe(self) -> bool:
        return any(m.role == ModelRole.DIT_HIGH_NOISE.value for m in self.models)


# ---------------------------------------------------------------- layer 2


class SparseAttentionConfig(StrictModel):
    sparse_impl: Optional[Literal["radial", "local", "sol"]] = Field(
        None, description="Sparse pattern: radial, local or sol; must agree with a sparse attn_impl."
    )
    dense_timesteps: int = Field(0, ge=0, description="First N denoising steps run dense attention.")
    dense_layers: int = Field(0, ge=0, description="First N transformer blocks run dense attention.")
    decay_factor: float = Field(1.0, gt=0, le=1.0)
    local_window_size: int = Field(0, ge=0, description="Tokens per side of the local window (0 = off).")
    block_size: int = Field(128, ge=16)


# The sparse attention implementations and the `sparse_impl` each one runs.
SPARSE_IMPL_OF = {
    AttnImplType.RADIAL_ATTN.value: "radial",
    AttnImplType.LOCAL_SPARSE_ATTN.value: "local",
    AttnImplType.SOL_ATTN.value: "sol",
}


class AttentionConfig(StrictModel):
    attn_impl: AttnImplType = AttnImplType.TORCH_SDPA
    sparse_config: Optional[SparseAttentionConfig] = None

    @classmethod
    def dense_attention(cls, attn_impl: AttnImplType = AttnImplType.FLASH_ATTN_2, **kwargs: Any) -> "AttentionConfig":
        """Dense attention with `attn_impl` (the reference design's default: FLASH_ATTN_2)."""
        return cls(attn_impl=attn_impl, sparse_config=None, **kwargs)

    @classmethod
    def radial_attention(cls, dense_timesteps: int = 40, dense_layers: int = 0, decay_factor: float = 1.0,
                         **kwargs: Any) -> "AttentionConfig":
        """Radial sparse attention; the first `dense_timesteps` steps and `dense_layers` blocks stay dense."""
        sparse = SparseAttentionConfig(sparse_impl="radial", dense_timesteps=dense_timesteps,
                                       dense_layers=dense_layers, decay_factor=decay_factor)
        return cls(attn_impl=AttnImplType.RADIAL_ATTN, sparse_config=sparse, **kwargs)

    @classmethod
    def local_sparse_attention(cls, dense_timesteps: int = 40, dense_layers: int = 0, local_window_size: int = 6,
                               **kwargs: Any) -> "AttentionConfig":
        """Local-window sparse attention of `local_window_size` tokens per side."""
        sparse = SparseAttentionConfig(sparse_impl="local", dense_timesteps=dense_timesteps,
                                       dense_layers=dense_layers, local_window_size=local_window_size)
        return cls(attn_impl=AttnImplType.LOCAL_SPARSE_ATTN, sparse_config=sparse, **kwargs)

    def is_sparse(self) -> bool:
        return self.attn_impl in SPARSE_IMPL_OF

    @model_validator(mode="after")
    def _sparse_impl_matches(self) -> "AttentionConfig":
        wanted = SPARSE_IMPL_OF.get(self.attn_impl)
        found = self.sparse_config.sparse_impl if self.sparse_config is not None else None
        if wanted is not None and found is not None and found != wanted:
            raise ValueError(f"attn_impl {self.attn_impl} runs sparse_impl {wanted!r}, but sparse_config.sparse_impl "
                             f"is {found!r}; make them agree (or leave sparse_impl out)")
        return self


class OffloadConfig(StrictModel):
    offload_type: WeightOffloadType = WeightOffloadType.NO_CPU_OFFLOAD
    pin_cpu_memory: bool = True
    offload_ratio: float = Field(1.0, gt=0, le=1.0, description="SEQUENTIAL/ASYNC_CPU_OFFLOAD: fraction of the "
                                 "DiT's blocks kept on the CPU and streamed in (spread evenly); the rest stay resident.")
    prefetch_size: int = Field(1, ge=0, description="ASYNC_CPU_OFFLOAD: block groups copied ahead of the one "
                               "computing (at least 1); MODEL_CPU_OFFLOAD: 0 turns the planned prefetch off.")
    blocks_per_group: Optional[PositiveInt] = Field(
        None, description="SEQUENTIAL/ASYNC_CPU_OFFLOAD: blocks streamed in together (one copy, one device buffer); "
        "unset: the compiler takes the fewest blocks whose weights reach 64 MiB. The plan records the choice.")


class CompileConfig(StrictModel):
    enabled: bool = False
    backend: CompileBackend = CompileBackend.INDUCTOR
    mode: CompileMode = CompileMode.DEFAULT
    fullgraph: bool = False
    dynamic: bool = False


class QuantConfig(StrictModel):
    quant_type: QuantType = QuantType.NONE
    skip_modules: list[str] = Field(default_factory=list, description="Module name patterns left unquantised.")


class LoraConfig(StrictModel):
    """One LoRA file for this model: kohya/ComfyUI (`lora_down`/`lora_up`/`alpha`, `diffusion_model.` or
    `lora_unet_` prefixes, `.diff`/`.diff_b`/`.diff_m` full differences) or diffusers/PEFT (`lora_A`/`lora_B`)."""

    path: str = Field(min_length=1, description="The LoRA .safetensors file; relative to the recipe.")
    strength: float = Field(1.0, description="Multiplier of the LoRA's update (times alpha / rank).")
    merge: bool = Field(True, description="true: added into the weights at load; false: applied beside each "
                        "targeted linear (y = W x + strength * alpha/rank * up(down x)), which leaves FP8 "
                        "weights FP8 (required for a LoRA on an FP8 checkpoint's linears).")
    on_mismatch: Literal["error", "warn"] = Field(
        "error", description="A LoRA module that names no layer of the model (or one of another shape): error "
        "refuses the recipe with the counts; warn applies the modules that match and warns.")


class FeatureCacheConfig(StrictModel):
    method: FeatureCacheMethod = FeatureCacheMethod.NONE
    threshold: float = Field(0.0, ge=0)


class ModelRuntimeConfig(StrictModel):
    """Per-model execution settings (keyed by the model's name in layer 1)."""

    attention_config: AttentionConfig = Field(default_factory=AttentionConfig)
    offload_config: OffloadConfig = Field(default_factory=OffloadConfig)
    compile_config: CompileConfig = Field(default_factory=CompileConfig)
    quant_config: QuantConfig = Field(default_factory=QuantConfig)
    lora_configs: list[LoraConfig] = Field(default_factory=list)
    feature_cache_config: FeatureCacheConfig = Field(default_factory=FeatureCacheConfig)
    torch_dtype: Optional[TorchDtype] = Field(None, description="Override of layer1.torch_dtype for this model.")
    run_on_cpu: bool = Field(False, description="Keep this model in host memory and run it on the CPU (its outputs "
                             "are copied to the device): the text encoder or the CLIP image encoder only.")


# Mesh dimensions; each one's degree is the field `<dim>_degree` of ParallelConfig.
PARALLEL_DIMS = ("dp", "cfg", "sp_ulysses", "sp_ring", "pp", "tp")
# The same dimensions as the plan's mesh lays them out, outermost first: pipeline stages span the
# most distant ranks; tensor parallelism, the most communication-heavy, stays innermost (neighbouring
# ranks, same NVLink island); Ulysses inside ring, since its all-to-all is heavier than ring's P2P.
MESH_ORDER = ("pp", "dp", "cfg", "sp_ring", "sp_ulysses", "tp")


class ParallelConfig(StrictModel):
    device_ids: Optional[list[int]] = Field(None, description="Devices to use; default 0..num_devices-1.")
    dp_degree: PositiveInt = Field(1, description="Data parallel: prompts of a batch split across groups.")
    cfg_degree: PositiveInt = Field(1, le=2, description="CFG parallel: positive and negative branch on 2 ranks.")
    sp_ulysses_degree: PositiveInt = Field(1, description="Ulysses sequence parallel (all-to-all over heads).")
    sp_ring_degree: PositiveInt = Field(1, description="Ring attention sequence parallel.")
    pp_degree: PositiveInt = Field(1, description="Pipeline parallel (not executed yet).")
    tp_degree: PositiveInt = Field(1, description="Tensor parallel DiT.")
    enable_fsdp: bool = Field(False, description="Shard DiT and text-encoder weights across ranks (FSDP2).")
    timeout: PositiveInt = Field(600, description="Seconds a collective may wait before the run is ended.")

    def degree(self, dim: str) -> int:
        return getattr(self, f"{dim}_degree")

    def validate(self) -> "ParallelConfig":  # type: ignore[override]
        """The reference design's check: the degrees multiply to the device count (len(device_ids), or 1
        device when device_ids is None). Returns self; raises ValueError naming the degrees otherwise.

        This instance method overrides pydantic's deprecated classmethod `BaseModel.validate(value)`, which
        pydantic itself never calls; `ParallelConfig.validate(value)` on the class keeps that meaning.
        """
        if not isinstance(self, ParallelConfig):  # called on the class with a value: pydantic's meaning
            return super(ParallelConfig, ParallelConfig).validate(self)  # type: ignore[misc]
        devices = len(self.device_ids) if self.device_ids is not None else 1
        if self.world_size != devices:
            degrees = " x ".join(f"{d}_degree={self.degree(d)}" for d in PARALLEL_DIMS)
            listed = (f"device_ids {self.device_ids} lists {devices} device(s)" if self.device_ids is not None
                      else "device_ids is None, which means 1 device")
            raise ValueError(f"ParallelConfig: the parallel degrees multiply to {self.world_size} ({degrees}), but "
                             f"{listed}; list {self.world_size} device_ids or change the degrees to multiply "
                             f"to {devices}")
        return self

    @property
    def world_size(self) -> int:
        return math.prod(self.degree(d) for d in PARALLEL_DIMS)

    @field_validator("device_ids")
    @classmethod
    def _ids_unique(cls, ids: Optional[list[int]]) -> Optional[list[int]]:
        if ids is not None and (len(set(ids)) != len(ids) or any(i < 0 for i in ids)):
            raise ValueError(f"device_ids must be distinct non-negative integers, got {ids}")
        return ids


# The reference design's per-model keywords of Wan21/Wan22VideoPipelineConfig, and the layer-1 model name
# each one configures (its role's name; VFI has no layer-1 role yet, so a recipe refuses "vfi").
MODEL_CONFIG_KEYWORDS = {
    "dit_config": ModelRole.DIT.value,
    "dit_high_config": ModelRole.DIT_HIGH_NOISE.value,
    "dit_low_config": ModelRole.DIT_LOW_NOISE.value,
    "vae_config": ModelRole.VAE.value,
    "text_encoding_config": ModelRole.TEXT_ENCODER.value,
    "clip_config": ModelRole.IMAGE_ENCODER.value,
    "vfi_config": "vfi",
}


class Layer2(StrictModel):
    """Inference algorithm: fixed in the plan."""

    sample_solver: SampleSolver = SampleSolver.UNIPC
    num_inference_steps: PositiveInt = 50
    denoising_step_list: Optional[list[int]] = Field(
        None, description="A step-distilled model's own training timesteps, highest first (LightX2V's key; e.g. "
        "[1000, 750, 500, 250] for the 4-step Wan models): sampled instead of the solver's grid, each t at the "
        "training grid's sigma 1 - t/1000 shifted by sigma_shift. num_inference_steps must equal its length; "
        "sample_solver \"euler\" (the flow step: LightX2V's current distill schedulers, Wan2.2-Lightning) or \"lcm\" "
        "(x0 re-noised to the next sigma: LightX2V's Wan2.1 distill sampler of Jul-Nov 2025).")
    num_frames: PositiveInt = Field(81, description="Video frames; must be 4k+1 for the Wan VAE.")
    fps: PositiveInt = 16
    cfg_scale: float = Field(5.0, ge=0)
    cfg_scale_high: Optional[float] = Field(None, ge=0, description="MoE: CFG scale of the high-noise DiT.")
    cfg_scale_low: Optional[float] = Field(None, ge=0, description="MoE: CFG scale of the low-noise DiT.")
    boundary: Optional[float] = Field(None, gt=0, lt=1, description="MoE: switch to the low-noise DiT below t/T.")
    sigma_shift: float = Field(5.0, gt=0)
    text_len: PositiveInt = Field(512, description="Tokens of text context.")
    tiled: bool = False
    tile_size: list[PositiveInt] = Field(default_factory=lambda: [34, 34], min_length=2, max_length=2,
                                         description="VAE tile size in latent pixels (height, width).")
    negative_prompt: str = ""
    enable_clip_stage: bool = Field(False, description="Run the image encoder (role image_encoder, CLIP) on the "
                                    "conditioning image; Wan2.1 I2V needs it. True exactly when that model is present.")
    enable_denoising_parallel: bool = True
    enable_vae_parallel: bool = False
    enable_vfi: bool = False
    enable_sr: bool = False
    lq_noise_strength: float = Field(0.0, ge=0, le=1)
    models: dict[str, ModelRuntimeConfig] = Field(default_factory=dict)
    parallel_config: ParallelConfig = Field(default_factory=ParallelConfig)

    @model_validator(mode="before")
    @classmethod
    def _model_config_keywords(cls, data: Any) -> Any:
        """Layer2 is also the reference design's Wan21VideoPipelineConfig / Wan22VideoPipelineConfig: their
        per-model keywords (`dit_config=`, `vae_config=`, ...: MODEL_CONFIG_KEYWORDS) are filed under `models`
        by the model's conventional name. Construction keywords only: never stored, never dumped, and not
        recipe keys (the JSON Schema refuses them in TOML)."""
        if not isinstance(data, dict) or not MODEL_CONFIG_KEYWORDS.keys() & data.keys():
            return data
        data = dict(data)
        models = dict(data.get("models") or {})
        for keyword, name in MODEL_CONFIG_KEYWORDS.items():
            if keyword in data:
                if name in models:
                    raise ValueError(f"{keyword} configures model {name!r}, which models also sets; give it once")
                models[name] = data.pop(keyword)
        data["models"] = models
        return data

    @model_validator(mode="after")
    def _step_list(self) -> "Layer2":
        steps = self.denoising_step_list
        if steps is None:
            if self.sample_solver == SampleSolver.LCM.value:
                raise ValueError("sample_solver \"lcm\" samples a step-distilled model's own timesteps: set "
                                 "layer2.denoising_step_list (e.g. [1000, 750, 500, 250])")
            return self
        check_step_list(steps)
        if len(steps) != self.num_inference_steps:
            raise ValueError(f"layer2.denoising_step_list has {len(steps)} timesteps but num_inference_steps is "
                             f"{self.num_inference_steps}; set num_inference_steps = {len(steps)}")
        if self.sample_solver not in (SampleSolver.EULER.value, SampleSolver.LCM.value):
            raise ValueError(f"layer2.denoising_step_list is sampled with sample_solver \"euler\" or \"lcm\", not "
                             f"{self.sample_solver!r}")
        return self

    @field_validator("num_frames")
    @classmethod
    def _frames_4k_plus_1(cls, n: int) -> int:
        if (n - 1) % 4:
            lower, upper = n - (n - 1) % 4, n - (n - 1) % 4 + 4
            raise ValueError(f"num_frames must be 4k+1 (the Wan VAE compresses time 4x); use {lower} or {upper}")
        return n


# ---------------------------------------------------------------- layer 3


class StringParam(StrictModel):
    default: str = ""
    required: bool = False
    description: str = ""


class IntParam(StrictModel):
    default: int = 42
    minimum: int = 0
    maximum: int = 2**63 - 1
    description: str = ""

    @model_validator(mode="after")
    def _default_in_range(self) -> "IntParam":
        if not self.minimum <= self.default <= self.maximum:
            raise ValueError(f"default {self.default} is outside [{self.minimum}, {self.maximum}]")
        return self


class _ChoiceParam(StrictModel):
    """A parameter with a closed set of choices; its default must be one of them."""

    @model_validator(mode="after")
    def _default_in_choices(self):  # type: ignore[no-untyped-def]
        if self.default not in self.choices:  # type: ignore[attr-defined]
            raise ValueError(f"default {self.default!r} is not one of the choices {self.choices}")  # type: ignore[attr-defined]
        return self


class ResolutionParam(_ChoiceParam):
    default: Resolution = Resolution.P480
    choices: list[Resolution] = Field(default_factory=lambda: [Resolution.P480, Resolution.P720], min_length=1)
    description: str = ""


class AspectRatioParam(_ChoiceParam):
    default: AspectRatio = AspectRatio.R16_9
    choices: list[AspectRatio] = Field(default_factory=lambda: list(AspectRatio), min_length=1)
    description: str = ""


class ImageParam(StrictModel):
    required: bool = Field(True, description="wan_i2v: must stay true (the image is the video's first frame). "
                           "wan_ti2v: false lets each run choose: with --image, image-to-video; without, text-to-video.")
    description: str = "Conditioning image (I2V)."


class Layer3(StrictModel):
    """Parameters each `telefuser-run` call may set, with their defaults and allowed values."""

    prompt: StringParam = Field(default_factory=lambda: StringParam(required=True))
    negative_prompt: StringParam = Field(default_factory=StringParam)
    seed: IntParam = Field(default_factory=IntParam)
    resolution: ResolutionParam = Field(default_factory=ResolutionParam)
    aspect_ratio: AspectRatioParam = Field(default_factory=AspectRatioParam)
    image: Optional[ImageParam] = Field(None, description="Present only for image-to-video pipelines.")


# ---------------------------------------------------------------- recipe


# Built from TOML by telefuser.compiler.load_recipe, or in Python from these models (telefuser.core.config
# names them as the reference design does); telefuser.compile takes either.
class Recipe(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", description="Deployment name (model x hardware).")
    description: str = ""
    extends: Optional[str] = Field(None, description="Base recipe, relative to this file; merged first.")
    target: Target = Field(default_factory=Target)
    layer1: Layer1
    layer2: Layer2 = Field(default_factory=Layer2)
    layer3: Layer3 = Field(default_factory=Layer3)

    @model_validator(mode="after")
    def _cross_layer_rules(self) -> "Recipe":
        l1, l2 = self.layer1, self.layer2
        names = {m.name for m in l1.models}
        unknown = sorted(set(l2.models) - names)
        if unknown:
            raise ValueError(
                f"layer2.models names unknown model(s) {', '.join(unknown)}; layer1 defines {', '.join(sorted(names))}"
            )
        moe_fields = {"cfg_scale_high": l2.cfg_scale_high, "cfg_scale_low": l2.cfg_scale_low, "boundary": l2.boundary}
        if not l1.is_moe:
            set_fields = [k for k, v in moe_fields.items() if v is not None]
            if set_fields:
                raise ValueError(f"layer2.{', layer2.'.join(set_fields)} apply only to MoE pipelines (two DiTs)")
        elif l2.boundary is None:
            raise ValueError("an MoE pipeline needs layer2.boundary in (0, 1), e.g. 0.875 for Wan2.2 T2V A14B")
        parallel = l2.parallel_config
        world = parallel.world_size
        devices = len(parallel.device_ids) if parallel.device_ids is not None else self.target.num_devices
        if world != devices:
            degrees = " x ".join(f"{d}_degree={parallel.degree(d)}" for d in PARALLEL_DIMS)
            raise ValueError(
                f"parallel degrees multiply to {world} ({degrees}) but the plan has {devices} device(s); "
                "make the product equal target.num_devices (and len(device_ids) if given)"
            )
        if parallel.device_ids is not None and len(parallel.device_ids) != self.target.num_devices:
            raise ValueError(
                f"layer2.parallel_config.device_ids lists {len(parallel.device_ids)} devices "
                f"but target.num_devices is {self.target.num_devices}"
            )
        if parallel.cfg_degree == 2 and l2.cfg_scale == 1.0 and not l1.is_moe:
            raise ValueError("cfg parallel (cfg_degree = 2) needs classifier-free guidance; cfg_scale 1.0 has no negative branch")
        takes_image = (PipelineType.WAN_I2V.value, PipelineType.WAN_TI2V.value)
        if self.layer3.image is not None and l1.pipeline not in takes_image:
            raise ValueError("layer3.image is only for the wan_i2v pipeline (image-to-video) and the wan_ti2v pipeline "
                             "(Wan2.2 TI2V: text- or image-to-video)")
        if l1.pipeline == PipelineType.WAN_I2V.value and self.layer3.image is None:
            raise ValueError("the wan_i2v pipeline needs a [layer3.image] parameter")
        if self.layer3.image is not None and not self.layer3.image.required and \
                l1.pipeline != PipelineType.WAN_TI2V.value:
            raise ValueError("layer3.image.required must be true: the image is the video's first frame, and an "
                             "image-to-video plan has no default image (only a wan_ti2v plan, whose one checkpoint "
                             "also makes text-to-video, may take the image optionally)")
        roles = {m.role for m in l1.models}
        clip = ModelRole.IMAGE_ENCODER.value in roles
        if clip and l1.pipeline != PipelineType.WAN_I2V.value:
            raise ValueError("a model with role 'image_encoder' is only for the wan_i2v pipeline (it encodes the "
                             "conditioning image); remove it, or set layer1.pipeline = \"wan_i2v\"")
        if l2.enable_clip_stage and not clip:
            raise ValueError("layer2.enable_clip_stage = true needs a model with role 'image_encoder' (the CLIP "
                             "vision tower, class CLIPVision) in layer1.models; add it, or set enable_clip_stage = false")
        if clip and not l2.enable_clip_stage:
            raise ValueError("layer1.models has an image_encoder, so the plan runs the CLIP stage: set "
                             "layer2.enable_clip_stage = true (or remove the image_encoder)")
        return self

    def to_data(self) -> dict[str, Any]:
        """The recipe as a TOML file of it holds it: JSON types, recipe key names, only the values that differ
        from their defaults (so `extends` and the file stay small), no nulls (TOML has none; every optional
        key defaults to null). `Recipe.model_validate(recipe.to_data()) == recipe`."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude_none=True)

    def to_toml(self) -> str:
        """TOML text of `to_data()`, which loads back (tomllib, or `load_recipe` from a file) to an equal Recipe."""
        lines: list[str] = []
        _toml_table(self.to_data(), (), lines)
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- TOML text
# A tiny emitter rather than a dependency (tomli-w): a recipe holds only strings, numbers, booleans,
# lists, tables and the one array of tables layer1.models (and lora_configs), all from to_data().

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # ints as digits; floats in their shortest round-trip form (no nan/inf in a recipe)
    if isinstance(value, str):  # JSON's escapes are TOML basic-string escapes; TOML also wants DEL escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_table(table: dict[str, Any], path: tuple[str, ...], lines: list[str], array: bool = False) -> None:
    """One table: its plain keys, then its sub-tables under headers. Top-level sections and tables that
    hold tables get a [header]; other tables below them are written inline, as recipes are by hand."""

    def nested(v: Any) -> bool:
        return _is_table_array(v) or (isinstance(v, dict) and (not path or any(
            isinstance(x, dict) or _is_table_array(x) for x in v.values())))

    plain = [(k, v) for k, v in table.items() if not nested(v)]
    if path and (array or plain or not table):
        header = ".".join(_toml_key(k) for k in path)
        lines += ["", f"[[{header}]]" if array else f"[{header}]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain]
    for key, value in table.items():
        if _is_table_array(value):
            for entry in value:
                _toml_table(entry, (*path, key), lines, array=True)
        elif nested(value):
            _toml_table(value, (*path, key), lines)
