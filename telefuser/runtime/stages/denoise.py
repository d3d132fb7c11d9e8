"""denoise: the plan's solver over its timesteps with classifier-free guidance; one DiT, or Wan2.2's
high-/low-noise pair switched at the boundary. Under cfg parallel (cfg degree 2) the conditional and
the unconditional prediction run on the two cfg ranks and are exchanged every step; under sequence
parallel the DiT itself was parallelised at load time (`telefuser.distributed.parallelize_wan`).

Wan2.2 TI2V with an image (`first_frame`): the image's latent replaces the first latent frame before the
first step and after every step (Wan2.2's `latent = (1 - mask) * z + mask * latent` with masks_like's 0/1
mask: exactly a replacement), and the DiT gets a timestep per token, 0 for the first frame's tokens and t
for the others (`mask[:, ::2, ::2] * t`, Wan2.2's textimage2video.py; diffusers' `expand_timesteps`)."""

from __future__ import annotations

import time
from typing import Optional

import torch

from telefuser.distributed.rank import RankContext
from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from ..skip_work import skip_work
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


def first_frame_latent(state: RunState, stage: Stage) -> Optional[torch.Tensor]:
    """TI2V: the image latent that stands for the first latent frame, or None (no image: text-to-video)."""
    name = stage.params.get("first_frame")
    if name is None:
        return None
    if name != "image_latent":
        raise PlanError(f"the plan's stage {stage.name!r} puts {name!r} in the first latent frame, which this runtime "
                        "does not make; recompile the recipe with this version.")
    if state.image_latent is None and state.params.image is not None:
        raise PlanError(f"the plan's stage {stage.name!r} puts the image latent in the first latent frame, but no "
                        "earlier stage made it; recompile the recipe.")
    return state.image_latent


def token_timesteps(t: torch.Tensor, latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[1, tokens]: 0 for the first latent frame's tokens, t for every other token (tokens in frame, height,
    width order, one per patch)."""
    pt, ph, pw = patch
    if pt != 1:
        raise PlanError(f"a DiT with a temporal patch of {pt} frames cannot hold the first latent frame apart; "
                        "recompile with a DiT of patch [1, 2, 2].")
    frames, height, width = latents.shape[2], latents.shape[3] // ph, latents.shape[4] // pw
    per_token = t.reshape(1, 1).to(torch.float32).expand(1, frames * height * width).clone()
    per_token[:, : height * width] = 0.0
    return per_token


@register("denoise")
def denoise(ctx: StageContext, state: RunState, stage: Stage) -> None:
    from tqdm.auto import tqdm

    from ..solvers import make_solver

    p = stage.params
    solver = make_solver(p["solver"], p["num_inference_steps"], p["sigma_shift"], p["num_train_timesteps"],
                         step_list=p.get("denoising_step_list"), generator=state.generator)
    timesteps = list(solver.timesteps)
    latents = state.latents
    first = first_frame_latent(state, stage)
    if first is not None:  # a new tensor, never written in place: the solver may keep the samples it was given
        latents = torch.cat([first.to(latents.dtype), latents[:, :, 1:]], dim=2)
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
        with ctx.placements[name].active() as dit, ctx.dispatch(name), \
                skip_work(ctx, state, stage, name, dit, context_null is not None and scale != 1.0) as skips:
            dtype = next(dit.parameters()).dtype
            extra = conditioning_inputs(state, stage, dtype)
            patch = tuple(dit.config.patch_size)
            for offset, t in enumerate(span):
                start = time.perf_counter()
                skips.begin_step(index - len(span) + offset)  # the step's index in the whole loop
                t_in = t.reshape(1) if first is None else token_timesteps(t, latents, patch)
                velocity = guided(dit, latents.to(dtype), t_in.to(ctx.device), state.context.to(dtype),
                                  context_null, scale, ctx.rank, extra)
                latents = solver.step(velocity, t, latents)
                if first is not None:
                    latents = torch.cat([first.to(latents.dtype), latents[:, :, 1:]], dim=2)
                ctx.sync()
                state.timings.steps.append(time.perf_counter() - start)
                bar.update(1)
                if state.on_step is not None:  # a caller's progress hook; an exception from it aborts the run
                    state.on_step(len(state.timings.steps), len(timesteps))
    bar.close()
    state.latents = latents
