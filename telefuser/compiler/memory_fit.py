"""A plan over the target's memory, refused with the settings that would fit.

The compiler picks nothing silently: it does not switch a recipe to offload on its own. When the estimate
exceeds the capacity it re-estimates the recipe with each memory-saving setting it does not use yet (the
encoders offloaded after encoding, HunyuanVideo-1.5's DiTs offloaded whole, the DiT(s) streamed block by block,
the text encoder streamed block by block, on-the-fly FP8 linears, a tiled VAE decode), alone and stacked in that
order, and names those whose estimate fits, as `--set` overrides.
"""

from __future__ import annotations

from typing import Any

from telefuser.errors import PlanError
from telefuser.schema.enums import BLOCK_MODES, WeightOffloadType, is_dit
from telefuser.schema.plan import MemoryEstimate, PlannedModel, ResolvedTarget
from telefuser.schema.model_config import ModelRuntimeConfig
from telefuser.schema.recipe import Recipe

from .block_tensors import BLOCKS
from .memory import estimate_memory
from .stages import build_stages

GIB = 2**30
FP8_MIN_CC = (8, 9)  # float8 tensor cores (compiler/dispatch.py refuses fp8 quantisation below)


def _candidates(recipe: Recipe, models: list[PlannedModel], target: ResolvedTarget) -> list[dict[str, Any]]:
    """Each memory-saving change the recipe does not make yet: {--set key: value}."""
    l2 = recipe.layer2
    found = []

    def runtime(name: str) -> ModelRuntimeConfig:
        return l2.models.get(name, ModelRuntimeConfig())

    encoders = [m.name for m in models if m.role in ("text_encoder", "image_encoder")
                and runtime(m.name).offload_config.offload_type == WeightOffloadType.NO_CPU_OFFLOAD and not runtime(m.name).run_on_cpu]
    if encoders and not l2.parallel_config.enable_fsdp:
        found.append({f"layer2.models.{n}.offload_config.offload_type": "MODEL_CPU_OFFLOAD" for n in encoders})
    no_split = l2.parallel_config.tp_degree == 1 and not l2.parallel_config.enable_fsdp  # block modes refuse both
    # DiTs of a class without block streaming, and HunyuanVideo-1.5's base and SR DiTs (one on the device at a
    # time): whole-model offload
    whole = [m.name for m in models if is_dit(m.role) and m.class_ != "WanDiT"
             and runtime(m.name).offload_config.offload_type == WeightOffloadType.NO_CPU_OFFLOAD]
    if whole and l2.parallel_config.world_size == 1:
        found.append({f"layer2.models.{n}.offload_config.offload_type": "MODEL_CPU_OFFLOAD" for n in whole})
    dits = [m for m in models if is_dit(m.role) and m.class_ in BLOCKS]
    streamable = [m.name for m in dits if runtime(m.name).offload_config.offload_type not in BLOCK_MODES]
    if streamable and no_split:
        found.append({f"layer2.models.{n}.offload_config.offload_type": "ASYNC_CPU_OFFLOAD" for n in streamable})
    # text encoders streamed block by block: the encode stage holds the non-block weights and two groups, not the
    # whole encoder (umT5-XXL 10.6 GiB, Qwen2.5-VL 12.3 GiB in bf16)
    text = [m.name for m in models if m.role == "text_encoder" and m.class_ in BLOCKS and not runtime(m.name).run_on_cpu
            and runtime(m.name).offload_config.offload_type not in BLOCK_MODES]
    if text and no_split:
        found.append({f"layer2.models.{n}.offload_config.offload_type": "ASYNC_CPU_OFFLOAD" for n in text})
    cc = tuple(int(p) for p in target.compute_capability.split(".")) if target.compute_capability else None
    plain = [m.name for m in dits if m.attributes.fp8_layout is None and runtime(m.name).quant_config.quant_type == "none"]
    if plain and target.device == "cuda" and cc is not None and cc >= FP8_MIN_CC and l2.parallel_config.tp_degree == 1:
        found.append({f"layer2.models.{n}.quant_config.quant_type": "fp8_e4m3fn" for n in plain})
    if not l2.tiled and not any(m.role == "vae" and m.class_ == "TAEHV" for m in models):  # TAEHV has no tiles
        found.append({"layer2.tiled": True})
    return found


def _apply(data: dict[str, Any], changes: dict[str, Any]) -> None:
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value


def _estimate_with(recipe: Recipe, models: list[PlannedModel], capacity: int,
                   changes: dict[str, Any]) -> MemoryEstimate:
    data = recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    _apply(data, changes)
    changed = Recipe.model_validate(data)
    return estimate_memory(changed, models, capacity, build_stages(changed, models))


def fitting_settings(recipe: Recipe, models: list[PlannedModel], target: ResolvedTarget) -> list[tuple[str, int]]:
    """(`--set` overrides, estimated peak) of every candidate change, alone and stacked in order, that fits; a stack
    that holds a change already fitting alone is not named again."""
    candidates = _candidates(recipe, models, target)
    tries = list(candidates)
    stacked: dict[str, Any] = {}
    for index, changes in enumerate(candidates):
        stacked = {**stacked, **changes}
        if index:
            tries.append(dict(stacked))
    fits: list[tuple[str, int]] = []
    fitting: list[dict[str, Any]] = []
    for changes in tries:
        if any(f.items() <= changes.items() for f in fitting):
            continue
        peak = _estimate_with(recipe, models, target.memory_bytes, changes).peak_bytes
        if peak <= target.memory_bytes:
            fitting.append(changes)
            fits.append((" ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}"
                                  for k, v in changes.items()), peak))
    return fits


def refuse_over_capacity(memory: MemoryEstimate, recipe: Recipe, models: list[PlannedModel],
                         target: ResolvedTarget) -> None:
    """Raise PlanError when the estimate exceeds the capacity, naming the largest stage and what would fit."""
    if memory.peak_bytes <= memory.capacity_bytes:
        return
    top = sorted(memory.breakdown.items(), key=lambda kv: -kv[1])[:3]
    worst = max(memory.stages, key=lambda s: s.peak_bytes, default=None)
    where = f" (largest in stage {worst.stage}: {worst.peak_bytes / GIB:.1f} GiB)" if worst is not None else ""
    fits = fitting_settings(recipe, models, target)
    if fits:
        advice = ("These settings would fit (estimated peak): " + "; ".join(
            f"{text} ({peak / GIB:.1f} GiB)" for text, peak in fits) + ". Set one in the recipe (or pass it to "
            "telefuser-compile), or")
    else:
        advice = ("No offload, FP8 or tiling setting fits here, alone or together (layer2.models.<name>."
                  "offload_config.offload_type = \"MODEL_CPU_OFFLOAD\" or, for a DiT, \"ASYNC_CPU_OFFLOAD\"; "
                  "quant_config.quant_type; layer2.tiled); lower layer2.num_frames,")
    raise PlanError(
        f"estimated peak memory {memory.peak_bytes / GIB:.1f} GiB per device exceeds the target's "
        f"{memory.capacity_bytes / GIB:.1f} GiB at {memory.at['width']}x{memory.at['height']}, "
        f"{memory.at['num_frames']} frames{where} (largest components: "
        f"{', '.join(f'{k} {v / GIB:.1f} GiB' for k, v in top)}). {advice} raise "
        "layer2.parallel_config.sp_ulysses_degree/tp_degree over more devices, or restrict layer3.resolution.choices.")
