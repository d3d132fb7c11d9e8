"""The recipe: three layers (model definition, inference algorithm, user parameters) and a target.

These models are the single source of truth: `recipe.schema.json` is generated
from them (`python -m telefuser.schema`), and cross-field rules live in their
validators.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, PositiveInt, field_validator, model_validator

from .base import StrictModel
from .enums import (
    FIXED_ASPECT_RATIOS,
    AspectRatio,
    ModelClass,
    ModelRole,
    PipelineType,
    Resolution,
    SampleSolver,
    TargetDevice,
    TorchDtype,
    WeightDtype,
)
# AttentionConfig: re-exported for callers in the attention work of issue 21 (tests/test_ops_dispatch.py, and
# compiler/dispatch.py's ModelRuntimeConfig), which import it from here; new code imports schema.model_config.
from .model_config import AttentionConfig, ModelRuntimeConfig  # noqa: F401
from .parallel import PARALLEL_DIMS, ParallelConfig
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


# The reference design's per-model keywords of Wan21/Wan22VideoPipelineConfig, and the layer-1 model name
# each one configures (its role's name).
MODEL_CONFIG_KEYWORDS = {
    "dit_config": ModelRole.DIT.value,
    "dit_high_config": ModelRole.DIT_HIGH_NOISE.value,
    "dit_low_config": ModelRole.DIT_LOW_NOISE.value,
    "vae_config": ModelRole.VAE.value,
    "text_encoding_config": ModelRole.TEXT_ENCODER.value,
    "clip_config": ModelRole.IMAGE_ENCODER.value,
    "vfi_config": "vfi",
}


class SRConfig(StrictModel):
    """The super-resolution stage's own sampling (HunyuanVideo-1.5, `layer2.enable_sr`): published for
    `720p_sr_distilled` (480p -> 720p) as flow_shift 2.0, guidance 1.0, 6 steps; `1080p_sr_distilled` 8 steps."""

    sample_solver: SampleSolver = Field(SampleSolver.EULER, description="Flow-matching Euler, as published.")
    num_inference_steps: PositiveInt = Field(6, description="SR steps (published: 6 for 720p, 8 for 1080p).")
    sigma_shift: float = Field(2.0, gt=0, description="The SR schedule's flow shift (published 2.0).")
    cfg_scale: float = Field(1.0, ge=0, description="Guidance of the SR DiT (published 1.0: one DiT call per step).")
    target_resolution: Resolution = Field(Resolution.P720, description="The SR video's resolution: its frame is "
                                          "that resolution's published bucket closest to the base frame's aspect "
                                          "ratio (480p 848x480 -> 720p 1280x720).")


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
    enable_vfi: bool = Field(False, description="Interpolate the decoded frames with the model of role vfi (RIFE): "
                             "vfi_multiplier x the frame rate, (num_frames - 1) x vfi_multiplier + 1 frames.")
    vfi_multiplier: Literal[2, 4] = Field(2, description="enable_vfi: frames made per original pair interval, 2 (one new "
                                "frame between each pair; 16 fps -> 32 fps) or 4 (by repeated halving).")
    vfi_batch_size: PositiveInt = Field(8, description="enable_vfi: frame pairs interpolated at once on the device.")
    enable_sr: bool = False
    lq_noise_strength: float = Field(0.0, ge=0, le=1)
    sr_config: Optional[SRConfig] = Field(None, description="HunyuanVideo-1.5 with enable_sr: the SR stage's solver "
                                          "settings (default: the published 720p_sr_distilled ones).")
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
    default: AspectRatio = Field(AspectRatio.R16_9, description='"auto" (image-to-video): the frame of the aspect '
                                 "ratio closest to the reference image's among the resolution's candidates.")
    choices: list[AspectRatio] = Field(default_factory=lambda: list(FIXED_ASPECT_RATIOS), min_length=1,
                                       description='Default: the fixed ratios, and "auto" first when it is the default.')
    description: str = ""

    @model_validator(mode="before")
    @classmethod
    def _auto_default_offered(cls, data: Any) -> Any:  # default = "auto" alone offers it beside the fixed ratios
        if isinstance(data, dict) and str(data.get("default")) == AspectRatio.AUTO.value and "choices" not in data:
            data = {**data, "choices": [AspectRatio.AUTO, *FIXED_ASPECT_RATIOS]}
        return data


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
        takes_image = (PipelineType.WAN_I2V.value, PipelineType.WAN_TI2V.value, PipelineType.HUNYUAN_VIDEO15_I2V.value)
        if self.layer3.image is not None and l1.pipeline not in takes_image:
            raise ValueError("layer3.image is only for the wan_i2v pipeline (image-to-video), the wan_ti2v pipeline "
                             "(Wan2.2 TI2V: text- or image-to-video) and hunyuan_video15_i2v")
        if l1.pipeline in (PipelineType.WAN_I2V.value, PipelineType.HUNYUAN_VIDEO15_I2V.value) and self.layer3.image is None:
            raise ValueError(f"the {l1.pipeline} pipeline needs a [layer3.image] parameter")
        if self.layer3.image is not None and not self.layer3.image.required and \
                l1.pipeline != PipelineType.WAN_TI2V.value:
            raise ValueError("layer3.image.required must be true: the image is the video's first frame, and an "
                             "image-to-video plan has no default image (only a wan_ti2v plan, whose one checkpoint "
                             "also makes text-to-video, may take the image optionally)")
        if AspectRatio.AUTO in self.layer3.aspect_ratio.choices:
            if l1.pipeline not in takes_image or self.layer3.image is None or not self.layer3.image.required:
                raise ValueError(f'layer3.aspect_ratio "auto" picks the frame from the reference image, so it needs an '
                                 f'image-to-video pipeline (hunyuan_video15_i2v, wan_i2v, or wan_ti2v with layer3.image.'
                                 f'required = true), not {l1.pipeline}; choose a ratio such as "16:9" (and remove "auto" '
                                 "from layer3.aspect_ratio.choices)")
        roles = {m.role for m in l1.models}
        clip = ModelRole.IMAGE_ENCODER.value in roles
        if clip and l1.pipeline not in (PipelineType.WAN_I2V.value, PipelineType.HUNYUAN_VIDEO15_I2V.value):
            raise ValueError("a model with role 'image_encoder' is only for the wan_i2v and hunyuan_video15_i2v "
                             "pipelines (it encodes the conditioning image); remove it, or set layer1.pipeline = "
                             "\"wan_i2v\" / \"hunyuan_video15_i2v\"")
        if l2.enable_clip_stage and not clip:
            raise ValueError("layer2.enable_clip_stage = true needs a model with role 'image_encoder' (the CLIP "
                             "vision tower, class CLIPVision) in layer1.models; add it, or set enable_clip_stage = false")
        if clip and not l2.enable_clip_stage:
            raise ValueError("layer1.models has an image_encoder, so the plan runs the CLIP stage: set "
                             "layer2.enable_clip_stage = true (or remove the image_encoder)")
        vfi = ModelRole.VFI.value in roles
        if l2.enable_vfi and not vfi:
            raise ValueError("layer2.enable_vfi = true needs a model with role 'vfi' (RIFE, class \"RIFE\": Practical-"
                             "RIFE v4.26's train_log/flownet.pkl) in layer1.models; add it, or set enable_vfi = false")
        if vfi and not l2.enable_vfi:
            raise ValueError("layer1.models has a model with role 'vfi', so the plan interpolates frames: set "
                             "layer2.enable_vfi = true (or remove the vfi model)")
        if not l2.enable_vfi and (l2.vfi_multiplier != 2 or l2.vfi_batch_size != 8):
            raise ValueError("layer2.vfi_multiplier / vfi_batch_size apply only with layer2.enable_vfi = true; "
                             "remove them, or set enable_vfi = true (with a model of role 'vfi')")
        return self

    def to_data(self) -> dict[str, Any]:
        """The recipe as a TOML file of it holds it: JSON types, recipe key names, only the values that differ
        from their defaults (so `extends` and the file stay small), no nulls (TOML has none; every optional
        key defaults to null). `Recipe.model_validate(recipe.to_data()) == recipe`."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude_none=True)

    def to_toml(self) -> str:
        """TOML text of `to_data()`, which loads back (tomllib, or `load_recipe` from a file) to an equal Recipe."""
        from .toml_writer import to_toml

        return to_toml(self.to_data())
