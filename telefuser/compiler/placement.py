"""Each model's placement, decided once: which ranks load it, where it is read to and runs, whether its host copy
is pinned, sharded or streamed block by block. The runtime (runtime/pipeline.py) reads `plan.placement` and
re-derives none of it from layer 2."""

from __future__ import annotations

from typing import Optional

from telefuser.schema.enums import BLOCK_MODES, ModelRole, WeightOffloadType, is_dit
from telefuser.schema.plan import MemoryEstimate, ModelPlacement, PlannedModel, Stage
from telefuser.schema.model_config import ModelRuntimeConfig
from telefuser.schema.recipe import Recipe

# Models FSDP shards over all ranks (parallel_config.enable_fsdp).
FSDP_ROLES = frozenset({ModelRole.DIT, ModelRole.DIT_HIGH_NOISE, ModelRole.DIT_LOW_NOISE, ModelRole.TEXT_ENCODER})
# Models only each dp replica's lead needs: it encodes the text and the image (broadcast to the other ranks) and
# decodes the video, unless the plan shares them (FSDP's sharded text encoder; the VAE under VAE parallel).
LEAD_ROLES = frozenset({ModelRole.TOKENIZER, ModelRole.TEXT_ENCODER, ModelRole.IMAGE_ENCODER, ModelRole.VAE})


def _on_every_rank(model: PlannedModel, recipe: Recipe, stages: list[Stage]) -> bool:
    if model.role not in LEAD_ROLES:
        return True
    if model.role == ModelRole.VAE:
        decode = next((s for s in stages if s.kind == "vae_decode"), None)
        return decode is not None and decode.params.get("parallel_ranks", 1) > 1
    parallel = recipe.layer2.parallel_config
    return parallel.enable_fsdp and parallel.world_size > 1 and model.role in (ModelRole.TOKENIZER,
                                                                                ModelRole.TEXT_ENCODER)


def _loaded_at_load(memory: Optional[MemoryEstimate], stages: list[Stage]) -> set[str]:
    """MODEL_CPU_OFFLOAD models whose first use the memory plan reads straight to the device at load."""
    if memory is None:
        return set()
    load_stage = next((s.name for s in stages if s.kind == "load"), None)
    return {d.model for d in memory.prefetch
            if d.prefetch and d.during_model is None and d.during_stage == load_stage}


def place_model(model: PlannedModel, recipe: Recipe, stages: list[Stage], memory: Optional[MemoryEstimate],
                device: str) -> ModelPlacement:
    runtime = recipe.layer2.models.get(model.name, ModelRuntimeConfig())
    parallel = recipe.layer2.parallel_config
    mode = WeightOffloadType(runtime.offload_config.offload_type)
    several_ranks = parallel.world_size > 1
    sharded = parallel.enable_fsdp and several_ranks and model.role in FSDP_ROLES
    blocks = memory.block_plan(model.name) if memory is not None and mode in BLOCK_MODES else None
    streamed = sum(len(g) for g in blocks.groups) if blocks is not None else 0
    first_on_device = mode == WeightOffloadType.MODEL_CPU_OFFLOAD and model.name in _loaded_at_load(memory, stages)
    on_cpu = runtime.run_on_cpu or model.role == ModelRole.TOKENIZER
    host_first = on_cpu or sharded or mode in BLOCK_MODES or (
        mode == WeightOffloadType.MODEL_CPU_OFFLOAD and not first_on_device)
    prefetched = 0 if memory is None else sum(1 for d in memory.prefetch
                                              if d.model == model.name and d.prefetch and d.during_model is not None)
    return ModelPlacement(
        model=model.name, offload_type=mode, ranks="all" if _on_every_rank(model, recipe, stages) else "replica_lead",
        compute_device="cpu" if on_cpu else "device", load_device="cpu" if host_first else "device",
        loaded_on_device=first_on_device,
        pinned=runtime.offload_config.pin_cpu_memory and device == "cuda" and mode != WeightOffloadType.NO_CPU_OFFLOAD,
        sharded=sharded, parallelized=several_ranks and is_dit(model.role), streamed_blocks=streamed,
        prefetched_uses=prefetched)


def resolve_placement(recipe: Recipe, models: list[PlannedModel], stages: list[Stage],
                      memory: Optional[MemoryEstimate], device: str) -> list[ModelPlacement]:
    """Every model's placement, in layer-1 order."""
    return [place_model(m, recipe, stages, memory, device) for m in models]
