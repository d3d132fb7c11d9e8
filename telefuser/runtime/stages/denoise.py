"""denoise: the plan's solver over its timesteps with classifier-free guidance; one DiT, or Wan2.2's
high-/low-noise pair switched at the boundary. Under cfg parallel (cfg degree 2) the conditional and
the unconditional prediction run on the two cfg ranks and are exchanged every step; under sequence
parallel the DiT itself was parallelised at load time (`telefuser.distributed.parallelize_wan`)."""

from __future__ import annotations

import time
from typing import Optional

import torch

from telefuser.distributed.rank import RankContext
from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register


def phases(stage: Stage) -> list[tuple[str, float, float]]:
    """(model, cfg scale, lowest timestep it serves): one DiT, or the MoE pair split at the boundary."""
    p = stage.params
    if "phases" not in p:
        return [(stage.models[0], p["cfg_scale"], float("-inf"))]
    high, low = p["phases"]
    return [(high["model"], high["cfg_scale"], p["boundary_timestep"]), (low["model"], low["cfg_scale"], float("-inf"))]


def guided(dit: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
           context_null: Optional[torch.Tensor], scale: float, rank: RankContext,
           conditioning: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), in float32. `conditioning` (image-to-video: `y`,
    `clip_fea`) goes to both branches alike, as Wan does: only the text differs between them."""
    extra = conditioning or {}
    if context_null is None or scale == 1.0:
        return dit(x, t, context, **extra).float()  # scale 1 gives exactly the conditional prediction
    if rank.degree("cfg") == 2:
        mine = context if rank.coords["cfg"] == 0 else context_null.to(context.dtype)
        cond, uncond = rank.all_gather(dit(x, t, mine, **extra).float(), "cfg")
    else:
        cond = dit(x, t, context, **extra).float()
        uncond = dit(x, t, context_null.to(context.dtype), **extra).float()
    return uncond + scale * (cond - uncond)


def conditioning_inputs(state: RunState, stage: Stage, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The DiT's extra inputs the plan names (`y`, `clip_fea`), made by earlier stages, in the DiT's dtype."""
    inputs = {}
    for name in stage.params.get("conditioning", []):
        if name not in ("y", "clip_fea"):
            raise PlanError(f"the plan's stage {stage.name!r} feeds the DiT {name!r}, which this runtime does not "
                            "make; recompile the recipe with this version.")
        value = getattr(state, name)
        if value is None:
            raise PlanError(f"the plan's stage {stage.name!r} feeds the DiT {name!r}, but no earlier stage made it; "
                            "recompile the recipe.")
        inputs[name] = value.to(dtype)
    return inputs


@register("denoise")
def denoise(ctx: StageContext, state: RunState, stage: Stage) -> None:
    from tqdm.auto import tqdm

    from ..solvers import make_solver

    p = stage.params
    solver = make_solver(p["solver"], p["num_inference_steps"], p["sigma_shift"], p["num_train_timesteps"])
    timesteps = list(solver.timesteps)
    latents = state.latents
    context_null = state.context_null if p["cfg"] else None
    bar = tqdm(total=len(timesteps), desc="denoising", unit="step", disable=not (state.progress and ctx.rank.rank == 0))
    index = 0
    for name, scale, lowest_t in phases(stage):
        span = []
        while index < len(timesteps) and float(timesteps[index]) >= lowest_t:
            span.append(timesteps[index])
            index += 1
        if not span:
            continue
        with ctx.placements[name].active() as dit, ctx.dispatch(name):
            dtype = next(dit.parameters()).dtype
            extra = conditioning_inputs(state, stage, dtype)
            for t in span:
                start = time.perf_counter()
                velocity = guided(dit, latents.to(dtype), t.reshape(1).to(ctx.device), state.context.to(dtype),
                                  context_null, scale, ctx.rank, extra)
                latents = solver.step(velocity, t, latents)
                ctx.sync()
                state.timings.steps.append(time.perf_counter() - start)
                bar.update(1)
    bar.close()
    state.latents = latents
