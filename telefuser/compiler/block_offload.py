"""SEQUENTIAL_CPU_OFFLOAD / ASYNC_CPU_OFFLOAD decided: which blocks of a DiT or text encoder stream, in which
groups, into how many device buffers, and how many bytes each holds; and the recipe settings the block modes and
`run_on_cpu` refuse.

A block's tensors are known from the architecture numbers alone (compiler/block_tensors.py, checked against the
model classes by the tests), so a group's device buffer is sized exactly as the runtime packs it
(runtime/offload.py: every tensor at a 512-byte boundary), without loading anything.
"""

from __future__ import annotations

import math

from telefuser.errors import RecipeError
from telefuser.schema.enums import BLOCK_MODES, WeightOffloadType, is_dit
from telefuser.schema.plan import BlockOffload, PlannedModel
from telefuser.schema.model_config import ModelRuntimeConfig
from telefuser.schema.recipe import Recipe

from .block_tensors import BLOCKS, block_tensors, wan_block_tensors  # noqa: F401 (wan_block_tensors: tests)

CPU_ROLES = ("text_encoder", "image_encoder")
ALIGN = 512  # runtime/memory/offload.py ALIGN: where every tensor starts in a packed buffer
# Default group size: the fewest blocks whose packed weights reach this. A host-to-device copy of 32-64 MiB already
# runs at the link's full speed (docs/benchmarks.md, "Reading the umT5 file": 30.8 GB/s at 16 MiB, 32.4 at 32, 30.7
# at 64), so a group this large pays its per-copy costs (launch, event, hook) once per >= 64 MiB: under 1% of the
# copy time. It is one block of a 14B or 5B DiT and three of 1.3B.
MIN_GROUP_BYTES = 64 << 20
FP8_QUANT = ("fp8_e4m3fn", "fp8_e4m3fn_rowwise", "int8")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def blocks_bytes(model: PlannedModel, runtime: ModelRuntimeConfig) -> list[tuple[int, int]]:
    """Per block in run order: (bytes its tensors take packed, their bytes unpadded). Linear weights quantised to 8
    bits (quant_type, or an FP8 checkpoint) take 1 byte per value plus their float32 scale (per row, or one per
    tensor); unmerged LoRA updates are added by plan_block_offload."""
    width = DTYPE_BYTES[model.compute_dtype]
    quant = runtime.quant_config.quant_type
    eight_bit = quant in FP8_QUANT or model.attributes.fp8_layout is not None
    per_row = quant in ("fp8_e4m3fn_rowwise", "int8") or (
        model.attributes.fp8_layout is not None and model.attributes.fp8_layout.granularity == "per_channel")
    out: list[tuple[int, int]] = []
    cache: dict[int, tuple[int, int]] = {}  # blocks of one kind share their tensor list
    for block in block_tensors(model.class_, model.arch):
        if id(block) not in cache:
            sizes: list[int] = []
            for _name, shape, kind in block:
                numel = math.prod(shape)
                if eight_bit and kind == "linear":
                    sizes += [numel, 4 * (shape[0] if per_row else 1)]
                elif eight_bit and quant == "int8" and kind == "bias":
                    sizes.append(4 * numel)  # int8 linears keep a float32 bias
                else:
                    sizes.append(width * numel)
            cache[id(block)] = (sum(_aligned(n) for n in sizes), sum(sizes))
        out.append(cache[id(block)])
    return out


def block_bytes(model: PlannedModel, runtime: ModelRuntimeConfig) -> tuple[int, int]:
    """(packed, unpadded) bytes of the model's largest block."""
    return max(blocks_bytes(model, runtime))


def streamed_blocks(num_blocks: int, ratio: float) -> list[int]:
    """round(ratio x blocks) block indices (at least one), spread evenly over the depth, so resident blocks sit
    between streamed ones and give the copies compute to hide behind."""
    count = min(num_blocks, max(1, round(ratio * num_blocks)))
    return [i for i in range(num_blocks) if (i + 1) * count // num_blocks > i * count // num_blocks]


def plan_block_offload(model: PlannedModel, runtime: ModelRuntimeConfig, weight_bytes: int,
                       several_dits: bool) -> BlockOffload:
    """The streaming of one model; `weight_bytes` is its whole weight estimate (memory._weight_bytes). A DiT's
    non-block weights stay on the device for the run unless several DiTs take turns (Wan2.2's experts,
    HunyuanVideo-1.5's base and SR DiTs); a text encoder's are copied in around its one use per video."""
    cfg = runtime.offload_config
    sizes = blocks_bytes(model, runtime)
    num_blocks = len(sizes)
    # Unmerged LoRA updates live beside the linears they update and stream with their block. The LoRAs published
    # for Wan update the block linears, so a block carries about 1/num_blocks of each file (an estimate: the
    # runtime sizes its ring from the tensors it packs).
    lora = sum(entry.file.size for entry in model.loras if not entry.merge) // num_blocks
    sizes = [(packed + lora, raw + lora) for packed, raw in sizes]
    streamed = streamed_blocks(num_blocks, cfg.offload_ratio)
    largest = max(sizes[i][0] for i in streamed)
    per_group = cfg.blocks_per_group or max(1, min(len(streamed), -(-MIN_GROUP_BYTES // max(largest, 1))))
    groups = [streamed[i:i + per_group] for i in range(0, len(streamed), per_group)]
    ahead = cfg.prefetch_size if cfg.offload_type == WeightOffloadType.ASYNC_CPU_OFFLOAD else 0
    resident_groups = min(len(groups), 1 + ahead)
    return BlockOffload(
        model=model.name, mode=cfg.offload_type, num_blocks=num_blocks, groups=groups,
        blocks_per_group=min(per_group, len(streamed)), groups_resident=resident_groups,
        prefetch_groups=min(ahead, resident_groups - 1),
        group_bytes=max(sum(sizes[i][0] for i in g) for g in groups),
        resident_bytes=max(0, weight_bytes - sum(sizes[i][1] for i in streamed)),
        resident_between_uses=is_dit(model.role) and not several_dits)


def check_offload_settings(recipe: Recipe, models: list[PlannedModel]) -> None:
    """Refuse block modes off a DiT, beside tp / FSDP, a fullgraph or CUDA-graph compile, ASYNC without prefetch, and
    run_on_cpu off the encoders."""
    l2 = recipe.layer2
    parallel = l2.parallel_config
    roles = {m.name: m.role for m in models}
    classes = {m.name: m.class_ for m in models}
    for name, runtime in l2.models.items():
        where = f"layer2.models.{name}"
        mode = runtime.offload_config.offload_type
        role = roles.get(name, "")
        if mode in BLOCK_MODES:
            # without weights (--no-weights) the class is not known yet: the roles whose classes all stream pass
            unknown = classes.get(name) == "auto" and (is_dit(role) or role == "text_encoder")
            if classes.get(name) not in BLOCKS and not unknown:
                raise RecipeError(
                    f"{where}.offload_config.offload_type = {mode!r}: block offload streams the repeated blocks of a "
                    f"DiT or a text encoder (classes {', '.join(sorted(BLOCKS))}), and {name!r} is the "
                    f"{role or 'unknown'} model ({classes.get(name) or 'unknown class'}); use \"MODEL_CPU_OFFLOAD\" "
                    "for it (whole model in host memory, copied in for its stage: the VAEs, CLIP, SigLIP and byT5 are "
                    "small beside their stage's activations, so streaming them would save little).")
            if parallel.tp_degree > 1 or parallel.enable_fsdp:
                what = "tp_degree > 1 (tensor-parallel weights stay on their device)" if parallel.tp_degree > 1 \
                    else "enable_fsdp (FSDP owns where the shards live)"
                raise RecipeError(
                    f"{where}.offload_config.offload_type = {mode!r} with layer2.parallel_config.{what}: the two "
                    "do not compose; use sp_ulysses_degree / sp_ring_degree / cfg_degree (which do), or "
                    "offload_type = \"NO_CPU_OFFLOAD\".")
            compile_cfg = runtime.compile_config
            if compile_cfg.enabled and (compile_cfg.backend == "cudagraphs"
                                        or compile_cfg.mode in ("reduce-overhead", "max-autotune")):
                raise RecipeError(
                    f"{where}: {mode} with compile_config backend {compile_cfg.backend!r}, mode {compile_cfg.mode!r}: "
                    "CUDA graphs replay fixed weight addresses, but streamed blocks move between ring buffers; use "
                    "mode \"default\" or \"max-autotune-no-cudagraphs\" with the inductor backend.")
            if runtime.compile_config.enabled and runtime.compile_config.fullgraph:
                raise RecipeError(
                    f"{where}: {mode} with compile_config.fullgraph = true: the streaming hook runs eagerly before "
                    "each streamed block (a graph break, which fullgraph forbids); set compile_config.fullgraph = "
                    "false (each block's own forward stays one graph).")
            if mode == WeightOffloadType.ASYNC_CPU_OFFLOAD and runtime.offload_config.prefetch_size < 1:
                raise RecipeError(
                    f"{where}.offload_config: ASYNC_CPU_OFFLOAD with prefetch_size = 0 copies nothing ahead; set "
                    "prefetch_size >= 1 (groups copied while one computes), or use \"SEQUENTIAL_CPU_OFFLOAD\".")
        if runtime.run_on_cpu:
            if role not in CPU_ROLES:
                raise RecipeError(
                    f"{where}.run_on_cpu = true: only the text encoder and the CLIP image encoder run on the CPU "
                    f"(one forward per video); {name!r} is the {role or 'unknown'} model. Drop the key, or use "
                    "offload_config.offload_type = \"MODEL_CPU_OFFLOAD\" to keep it in host memory between uses.")
            if mode != WeightOffloadType.NO_CPU_OFFLOAD:
                raise RecipeError(f"{where}: run_on_cpu = true keeps the model in host memory already; drop "
                                  f"offload_config.offload_type = {mode!r}.")
            if parallel.enable_fsdp and role == "text_encoder":
                raise RecipeError(f"{where}.run_on_cpu = true with layer2.parallel_config.enable_fsdp: FSDP shards the "
                                  "text encoder over the GPUs; drop one of them.")
