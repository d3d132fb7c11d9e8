"""The plan: every decision the compiler made, frozen. Also the `dump_config` output."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, model_validator

from .base import FrozenModel
from .enums import ModelClass, ModelRole, PipelineType, TorchDtype, WeightDtype, WeightOffloadType
from .recipe import Layer2

PLAN_FORMAT = "telefuser.plan"
PLAN_VERSION = "2"  # 2: `placement` (each model's placement, resolved by the compiler)

Scalar = Union[bool, int, float, str]


class RecipeInfo(FrozenModel):
    name: str
    description: str = ""
    path: str
    source_sha256: str = Field(description="sha256 of the recipe text after extends/--set resolution.")


class ResolvedTarget(FrozenModel):
    device: Literal["cpu", "cuda"]
    gpu: Optional[str] = None
    compute_capability: Optional[str] = None
    memory_bytes: int = Field(ge=0, description="Capacity per device.")
    num_devices: int = Field(ge=1)
    packages: list[str] = Field(description="Optional packages the decisions assumed present.")
    described_by: Literal["recipe", "this_machine"]


class FileFingerprint(FrozenModel):
    path: str
    size: int = Field(ge=0)
    header_sha256: str = Field(description="sha256 of the safetensors header (or of the pickle index).")
    sha256: Optional[str] = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the whole file, recorded by `telefuser-compile --hash-weights` and checked by "
        "`telefuser-run` before loading; null when the plan was compiled without it.",
    )


class Fp8Layout(FrozenModel):
    """How a checkpoint stores float8 (e4m3) weights, read from its tensor names, dtypes and shapes."""

    scale_key: Optional[Literal["scale_weight", "weight_scale"]] = Field(
        description="Suffix of the scale tensors beside each `<layer>.weight` (ComfyUI/Kijai scaled fp8: "
        "scale_weight; LightX2V and ComfyUI's newer format: weight_scale); null: no scales (scale 1).")
    granularity: Literal["per_tensor", "per_channel", "mixed", "unscaled"] = Field(
        description="Scale per weight tensor, per output channel, some of each, or none.")
    marker: bool = Field(description="The file carries ComfyUI's `scaled_fp8` marker tensor.")
    fp8_tensors: int = Field(ge=0, description="Tensors stored in float8_e4m3fn.")
    linear_parameters: int = Field(
        ge=0, description="Elements of the 2-D float8 `.weight` tensors: the linears kept in fp8 (1 byte each).")


class DetectedAttributes(FrozenModel):
    distill: bool = False
    moe: bool = False
    fp8: bool = False
    meanflow: bool = False
    fp8_layout: Optional[Fp8Layout] = Field(
        default=None, description="Set when the weights are stored in float8: scales and their layout.")


class PlannedLora(FrozenModel):
    """A LoRA of layer2.models.<name>.lora_configs, matched against the model's weights at compile time."""

    path: str
    strength: float
    merge: bool
    on_mismatch: Literal["error", "warn"]
    file: FileFingerprint
    key_layout: Literal["wan", "tencent", "diffusers", "kohya"] = Field(
        description="Module names as Wan's keys, Tencent's (HunyuanVideo-1.5), diffusers' keys, or kohya's flattened "
                    "`lora_unet_` names.")
    modules: int = Field(ge=0, description="Updates the file holds: low-rank pairs plus full differences.")
    matched: int = Field(ge=0, description="Of those, the ones that name a tensor of the model, of its shape.")
    unmatched_examples: list[str] = Field(default_factory=list,
                                          description="Up to 5 modules that match nothing (applied: none).")
    linears_covered: int = Field(ge=0, description="The model's linear layers the low-rank pairs update.")
    linears_total: int = Field(ge=0, description="The model's linear layers (2-D `.weight` tensors).")


class PlannedModel(FrozenModel):
    name: str
    role: ModelRole
    path: str
    class_: ModelClass = Field(alias="class")
    dtype: WeightDtype
    compute_dtype: TorchDtype
    key_layout: Literal["wan", "diffusers", "hf", "open_clip", "tokenizers", "ddp", "plain", "taehv", "tencent", "glyph"]
    attributes: DetectedAttributes
    arch: dict[str, Any] = Field(description="Constructor arguments of the model's config.")
    parameter_count: int = Field(ge=0)
    files: list[FileFingerprint]
    loras: list[PlannedLora] = Field(default_factory=list, description="The model's LoRAs, in application order.")


class Layer1Plan(FrozenModel):
    models: list[PlannedModel]


class UserParameter(FrozenModel):
    type: Literal["string", "integer", "choice", "path"]
    default: Optional[Scalar] = None
    choices: Optional[list[str]] = None
    minimum: Optional[int] = None
    maximum: Optional[int] = None
    required: bool = False
    description: str = ""


class Layer3Plan(FrozenModel):
    parameters: dict[str, UserParameter]
    frame_sizes: dict[str, dict[str, list[int]]] = Field(
        description="resolution -> aspect ratio -> [width, height] for the allowed choices."
    )
    image_frame_sizes: dict[str, list[list[int]]] = Field(
        default_factory=dict,
        description='aspect ratio "auto" (image-to-video): resolution -> every candidate [width, height], the one of '
                    "the aspect ratio closest to the reference image's picked at run time (first on a tie).")


class DispatchEntry(FrozenModel):
    model: str
    op: str
    impl: str
    reason: str


class RankInfo(FrozenModel):
    rank: int
    device_id: int
    coords: dict[str, int]


class Mesh(FrozenModel):
    world_size: int = Field(ge=1)
    order: list[str] = Field(description="Mesh dimensions, outermost first.")
    degrees: dict[str, int]
    ranks: list[RankInfo]
    groups: dict[str, list[list[int]]] = Field(description="Per dimension: the rank groups that communicate.")


class PrefetchDecision(FrozenModel):
    """One use of a MODEL_CPU_OFFLOAD model, and whether it is copied in ahead of it."""

    model: str = Field(description="The offloaded model.")
    stage: str = Field(description="The stage that uses it.")
    during_stage: Optional[str] = Field(
        default=None, description="The stage of the model use before this one in a video (null: none).")
    during_model: Optional[str] = Field(
        default=None, description="The model of that previous use: while it is active, this model is copied in.")
    prefetch: bool = Field(description="Copied in on a side stream while `during_model` runs in `during_stage`; "
                                       "false: copied in when its own stage activates it.")
    peak_bytes: int = Field(ge=0, description="Estimated peak per device during the previous use with both on the "
                                              "device (0 when there is no previous use).")
    reason: str


class BlockOffload(FrozenModel):
    """How a model (a DiT, a text encoder) under SEQUENTIAL_CPU_OFFLOAD / ASYNC_CPU_OFFLOAD streams its blocks; the
    runtime does exactly this."""

    model: str
    mode: Literal["SEQUENTIAL_CPU_OFFLOAD", "ASYNC_CPU_OFFLOAD"]
    num_blocks: int = Field(ge=1, description="The model's repeated blocks (its class's BLOCK_LISTS, in run order).")
    groups: list[list[int]] = Field(
        description="The streamed blocks (kept in host memory), in groups of blocks_per_group, in run order; a group "
        "is copied in as one. Blocks in no group stay resident on the device.")
    blocks_per_group: int = Field(ge=1)
    groups_resident: int = Field(ge=1, description="Device buffers of the ring a group is copied into: 1 (sequential: "
                                                   "copy, then compute) or 1 + prefetch_groups.")
    prefetch_groups: int = Field(ge=0, description="Groups copied ahead on a side stream while one computes (async): "
                                 "the next ones in run order, after the last group the first ones, which the next "
                                 "forward starts with.")
    group_bytes: int = Field(ge=0, description="Bytes of one ring buffer: the largest group's tensors, each aligned "
                                               "to 512 bytes.")
    resident_bytes: int = Field(ge=0, description="Bytes on the device outside the ring: non-block weights "
                                                  "(embeddings, time MLP, head, modulation) and the kept blocks.")
    resident_between_uses: bool = Field(
        description="true: the resident part stays on the device for the whole run; false (several DiTs: Wan2.2's "
        "MoE, HunyuanVideo-1.5's base and SR DiTs; a text encoder): it is copied in when the model becomes active and "
        "dropped after, so an inactive model is entirely in host memory.")


class ModelPlacement(FrozenModel):
    """Where one model's weights live and run, resolved once by the compiler; the runtime does exactly this."""

    model: str
    offload_type: WeightOffloadType = Field(
        description="NO_CPU_OFFLOAD: on the device for the whole run; MODEL_CPU_OFFLOAD: in host memory, copied in "
        "whole for each use; SEQUENTIAL/ASYNC_CPU_OFFLOAD: its blocks streamed as memory.block_offload records.")
    ranks: Literal["all", "replica_lead"] = Field(
        description="Which ranks load it: every rank, or only each dp replica's lead (which broadcasts its output "
        "or writes the video).")
    compute_device: Literal["device", "cpu"] = Field(
        description="Where its forward runs: the rank's device, or the CPU (run_on_cpu; outputs copied over).")
    load_device: Literal["device", "cpu"] = Field(
        description="Where its weights are read to at load: straight to the device, or to host memory first "
        "(offloaded, streamed or sharded models).")
    loaded_on_device: bool = Field(
        description="MODEL_CPU_OFFLOAD only: read to the device at load for its first use (memory.prefetch), its "
        "host copy made in the background.")
    pinned: bool = Field(description="Its host copy is page-locked (offloaded or streamed on a CUDA target).")
    sharded: bool = Field(description="FSDP shards its weights over all ranks.")
    parallelized: bool = Field(description="The mesh's tensor and sequence parallelism is applied to it (a DiT "
                                           "on several ranks).")
    streamed_blocks: int = Field(ge=0, description="Blocks streamed from host memory (memory.block_offload); 0: none.")
    prefetched_uses: int = Field(ge=0, description="Uses copied in ahead while the previous model runs "
                                                   "(memory.prefetch).")


class StageMemory(FrozenModel):
    """The estimated peak per device while one stage runs, by component."""

    stage: str
    peak_bytes: int = Field(ge=0)
    components: dict[str, int] = Field(description="resident (weights on the device for the whole run), weights of "
                                                   "models used in the stage, ring buffers, prefetches, activations, "
                                                   "workspace.")


class MemoryEstimate(FrozenModel):
    peak_bytes: int = Field(ge=0, description="Estimated peak per device: the largest stage's.")
    capacity_bytes: int = Field(ge=0)
    breakdown: dict[str, int] = Field(description="Bytes by component (weights per model, activations, ...).")
    at: dict[str, Scalar] = Field(description="The shape the estimate was made at (largest allowed).")
    prefetch: list[PrefetchDecision] = Field(
        default_factory=list,
        description="Per use of each MODEL_CPU_OFFLOAD model, in run order: whether the runtime copies it in "
        "while the previous model use runs (decided when both fit in the estimate).")
    block_offload: list[BlockOffload] = Field(
        default_factory=list, description="Per model under SEQUENTIAL_CPU_OFFLOAD / ASYNC_CPU_OFFLOAD: its streaming.")
    stages: list[StageMemory] = Field(default_factory=list,
                                      description="Per stage that uses a device, in run order: its estimated peak.")

    def block_plan(self, model: str) -> Optional[BlockOffload]:
        return next((b for b in self.block_offload if b.model == model), None)


class Stage(FrozenModel):
    name: str
    kind: str
    models: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)


class Plan(FrozenModel):
    format: Literal["telefuser.plan"] = PLAN_FORMAT
    version: str = PLAN_VERSION
    telefuser_version: str
    plan_hash: str = Field(description="sha256 of the canonical plan without plan_hash and timestamp.")
    timestamp: str
    recipe: RecipeInfo
    pipeline_type: PipelineType
    device: Literal["cpu", "cuda"]
    target: ResolvedTarget
    torch_dtype: TorchDtype
    layer1_model_definition: Layer1Plan
    layer2_inference_config: Layer2
    layer3_user_interface: Layer3Plan
    dispatch: list[DispatchEntry]
    mesh: Mesh
    memory: MemoryEstimate
    placement: list[ModelPlacement] = Field(description="Per model of layer 1, in layer-1 order.")
    stages: list[Stage]

    @model_validator(mode="after")
    def _placement_matches_the_plan(self) -> "Plan":
        """Each model is placed once, and a streamed model has its streaming recorded (the runtime does both)."""
        models = [m.name for m in self.layer1_model_definition.models]
        placed = [p.model for p in self.placement]
        if placed != models:
            raise ValueError(f"placement names models {placed}, but layer1_model_definition has {models}")
        for p in self.placement:
            blocks = self.memory.block_plan(p.model)
            recorded = sum(len(g) for g in blocks.groups) if blocks is not None else 0
            if p.streamed_blocks != recorded:
                raise ValueError(f"placement of {p.model!r} streams {p.streamed_blocks} blocks, but its streaming in "
                                 f"memory.block_offload has {recorded}")
        return self

    def model(self, role: str) -> PlannedModel:
        """The planned model with this role (KeyError names the roles present)."""
        for m in self.layer1_model_definition.models:
            if m.role == role:
                return m
        present = ", ".join(m.role for m in self.layer1_model_definition.models)
        raise KeyError(f"the plan has no model with role {role!r} (roles: {present})")

    def placement_of(self, model: str) -> ModelPlacement:
        """The placement the compiler decided for this model (KeyError when the plan has none for it)."""
        for p in self.placement:
            if p.model == model:
                return p
        raise KeyError(f"the plan places no model {model!r} (placed: {', '.join(p.model for p in self.placement)})")

    def dispatch_table(self, model: str) -> dict[str, str]:
        """op -> implementation for one model, as `telefuser.ops.dispatch.use_dispatch` takes it."""
        return {e.op: e.impl for e in self.dispatch if e.model == model}
