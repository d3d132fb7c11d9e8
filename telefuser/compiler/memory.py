"""Peak memory per device, estimated before anything is loaded.

weights: parameters x bytes of the compute dtype (fp8-quantised linears 1
byte), divided by tp (and by the mesh size under FSDP); offloaded models are
resident only while their stage runs, so their bytes count once, at the
largest of them. activations: the DiT at the largest allowed frame size and
num_frames, with tokens split by sequence parallelism: per token, the
residual stream plus the largest transient (the FFN hidden layer, or q/k/v/o)
in the compute dtype, times the CFG batch of 2; attention is flash-style
(no S x S matrix). The VAE decode workspace is VAE_LIVE_MAPS full-resolution
feature maps of one latent frame's 4 output frames at base_dim channels,
calibrated on an H100 (docs/benchmarks.md: 4.8 GiB peak for the Wan2.1 VAE at
480p x 81 frames), plus the decoded video in float32.
These are estimates for refusing the clearly impossible, not promises.
"""

from __future__ import annotations

from telefuser.schema.enums import ModelRole, WeightOffloadType
from telefuser.schema.plan import MemoryEstimate, PlannedModel
from telefuser.schema.recipe import ModelRuntimeConfig, Recipe
from telefuser.schema.resolution import RESOLUTION_TABLE

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
FP8_QUANT = ("fp8_e4m3fn", "fp8_e4m3fn_rowwise", "int8")
WORKSPACE_BYTES = 1 * 2**30  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
VAE_LIVE_MAPS = 15  # concatenated caches, padding copies, residual inputs and outputs at full resolution


def _largest_frame(recipe: Recipe) -> tuple[int, int, str, str]:
    best = (0, 0, "", "")
    for res in recipe.layer3.resolution.choices:
        for ar in recipe.layer3.aspect_ratio.choices:
            w, h = RESOLUTION_TABLE[res][ar]
            if w * h > best[0] * best[1]:
                best = (w, h, str(res), str(ar))
    return best


def _weight_bytes(model: PlannedModel, runtime: ModelRuntimeConfig, recipe: Recipe) -> int:
    bytes_per = DTYPE_BYTES[model.compute_dtype]
    if runtime.quant_config.quant_type in FP8_QUANT:
        bytes_per = 1
    total = model.parameter_count * bytes_per
    p = recipe.layer2.parallel_config
    if model.role.startswith("dit"):
        total //= p.tp_degree
    if p.enable_fsdp and (model.role.startswith("dit") or model.role == ModelRole.TEXT_ENCODER.value):
        total //= p.world_size  # each rank keeps its share (plus one whole block while it runs)
    return total


def estimate_memory(recipe: Recipe, models: list[PlannedModel], capacity: int) -> MemoryEstimate:
    l2 = recipe.layer2
    width, height, res, ar = _largest_frame(recipe)
    breakdown: dict[str, int] = {}
    resident, offloaded = 0, []
    for m in models:
        runtime = l2.models.get(m.name, ModelRuntimeConfig())
        size = _weight_bytes(m, runtime, recipe)
        breakdown[f"weights.{m.name}"] = size
        mode = runtime.offload_config.offload_type
        if mode == WeightOffloadType.NO_CPU_OFFLOAD.value:
            resident += size
        elif mode == WeightOffloadType.MODEL_CPU_OFFLOAD.value:
            offloaded.append(size)  # on the device only during its own stage
        else:  # sequential / async: the kept fraction stays, the rest streams through block by block
            resident += int(size * (1 - runtime.offload_config.offload_ratio))
    dit = next(m for m in models if m.role.startswith("dit"))
    dim, ffn = int(dit.arch.get("dim", 0)), int(dit.arch.get("ffn_dim", 0))
    act_bytes = DTYPE_BYTES[dit.compute_dtype]
    latent_frames = (l2.num_frames - 1) // 4 + 1
    tokens = latent_frames * (height // 16) * (width // 16)
    sp = l2.parallel_config.sp_ulysses_degree * l2.parallel_config.sp_ring_degree
    batch = 1 if l2.parallel_config.cfg_degree == 2 or l2.cfg_scale == 1.0 else 2
    breakdown["activations.dit"] = batch * -(-tokens // sp) * (2 * dim + max(ffn, 4 * dim)) * act_bytes
    vae = next((m for m in models if m.role == ModelRole.VAE.value), None)
    if vae is not None:
        base = int(vae.arch.get("base_dim", 96))
        breakdown["activations.vae_decode"] = VAE_LIVE_MAPS * 4 * base * width * height * DTYPE_BYTES[vae.compute_dtype] \
            + l2.num_frames * 3 * width * height * 4
    breakdown["workspace"] = WORKSPACE_BYTES
    peak_activation = max(breakdown["activations.dit"], breakdown.get("activations.vae_decode", 0))
    peak = int(resident + (max(offloaded) if offloaded else 0) + peak_activation + WORKSPACE_BYTES)
    return MemoryEstimate(peak_bytes=peak, capacity_bytes=capacity, breakdown=breakdown,
                          at={"width": width, "height": height, "resolution": res, "aspect_ratio": ar,
                              "num_frames": l2.num_frames, "tokens": tokens})
