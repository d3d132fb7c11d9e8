"""hy15_denoise: HunyuanVideo-1.5's base sampling, as its published pipelines (tencent/HunyuanVideo-1.5 and
diffusers' HunyuanVideo15Pipeline / HunyuanVideo15ImageToVideoPipeline) run it: flow-matching Euler over the grid
sigma_i = linspace(1, 0, N + 1)[i] shifted by sigma_shift (float32, as diffusers' FlowMatchEulerDiscreteScheduler
keeps it) or over a step-distilled model's `denoising_step_list` (schema/step_list.py), the DiT fed t = 1000 sigma,
classifier-free guidance uncond + scale (cond - uncond) with the two branches as separate batch-1 calls (their
context lengths differ: no attention mask needed), x <- x + (sigma_next - sigma) v. The plan may name another solver
of runtime/solvers instead (UniPC or DPM++ 2M over their own grid, as Wan's stage runs them; LCM on a step list).

Conditioning (`condition_latents`): T2V zeros; I2V the image's latent at frame 0 with a mask, and SigLIP's tokens in
both branches. A `step_cache` record in the stage's params attaches the plan's step cache around the DiT for the loop."""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage
from telefuser.schema.step_list import SHIFTED_LINSPACE_GRID, SOLVER_GRID, STEP_LIST_GRID, step_list_sigmas

from ..skip_work import skip_work
from .base import RunState, StageContext, register

def hy15_sigmas(num_inference_steps: int, shift: float, step_list: Optional[list[int]] = None) -> torch.Tensor:
    """[N + 1] float32: linspace(1, 0, N + 1)[:-1] shifted, then 0 (diffusers' set_timesteps(sigmas=...) arithmetic);
    with a distilled model's `step_list`, its timesteps' shifted sigmas on the training grid instead (LightX2V's
    HunyuanVideo-1.5 step-distill scheduler: the same flow Euler step, x0 at the last)."""
    if step_list is not None:
        return torch.tensor([*step_list_sigmas(step_list, shift), 0.0], dtype=torch.float32)
    sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].astype(np.float32)
    shifted = np.float32(shift) * sigmas / (np.float32(1) + (np.float32(shift) - np.float32(1)) * sigmas)
    return torch.cat([torch.from_numpy(shifted.astype(np.float32)), torch.zeros(1)])


def check_schedule(stage: Stage) -> None:
    p = stage.params
    listed = p.get("grid") == STEP_LIST_GRID and len(p.get("denoising_step_list") or []) == p.get("num_inference_steps")
    grid_ok = {"euler": p.get("grid") == SHIFTED_LINSPACE_GRID or listed, "lcm": listed,
               "unipc": p.get("grid") == SOLVER_GRID, "dpm++": p.get("grid") == SOLVER_GRID}.get(p.get("solver"), False)
    if not grid_ok or p.get("num_train_timesteps") != 1000:
        raise PlanError(f"the plan's stage {stage.name!r} samples with {p.get('solver')!r} over grid {p.get('grid')!r} "
                        "(1000 training steps expected), which this runtime does not; recompile with this version.")


Update = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def sampler(p: dict, generator: Optional[torch.Generator], device: torch.device) -> tuple[list[float], Update]:
    """(the timesteps fed to the DiT, update(i, velocity, latents)): HunyuanVideo-1.5's Euler (t = 1000 sigma,
    x + (sigma_next - sigma) v, in float32) over its grid or a step list, or a solver of runtime/solvers (UniPC and
    DPM++ 2M on their own grid, as for Wan; LCM on a step list)."""
    if p["solver"] == "euler":
        sigmas = hy15_sigmas(p["num_inference_steps"], p["sigma_shift"], p.get("denoising_step_list"))
        return (sigmas[:-1] * 1000.0).tolist(), lambda i, v, x: x + (sigmas[i + 1] - sigmas[i]).to(device) * v
    from ..solvers import make_solver

    solver = make_solver(p["solver"], p["num_inference_steps"], p["sigma_shift"], p["num_train_timesteps"],
                         step_list=p.get("denoising_step_list"), generator=generator)
    timesteps = solver.timesteps
    return timesteps.tolist(), lambda i, v, x: solver.step(v, timesteps[i], x)


def text_inputs(branch: dict, dtype: torch.dtype) -> tuple:
    """The DiT's positional text inputs of one CFG branch (hy15_text_encode's dict), in the DiT's dtype."""
    byt5 = branch["byt5_states"]
    return (branch["text_states"].to(dtype), branch["text_mask"], None if byt5 is None else byt5.to(dtype),
            branch["byt5_mask"])


@register("hy15_denoise")
def hy15_denoise(ctx: StageContext, state: RunState, stage: Stage) -> None:
    from tqdm.auto import tqdm

    from telefuser.models.hunyuan15.dit_layers import condition_latents
    from telefuser.models.hunyuan15.sr import meanflow_t_r

    check_schedule(stage)
    p = stage.params
    text = state.family.get("text")
    if not text:
        raise PlanError(f"the plan's stage {stage.name!r} needs the text inputs, but no earlier stage made them; recompile.")
    if p["condition"] not in ("t2v", "i2v"):
        raise PlanError(f"the plan's stage {stage.name!r} conditions on {p['conditioning']!r}; recompile with this version.")
    i2v = p["condition"] == "i2v"
    if i2v and (state.image_latent is None or "vision_states" not in state.family):
        raise PlanError(f"the plan's stage {stage.name!r} needs the image's latent and SigLIP tokens, but no earlier "
                        "stage made them; recompile.")
    timesteps, update = sampler(p, state.generator, ctx.device)
    scale = float(p["cfg_scale"])
    guided = p["cfg"] and scale != 1.0 and len(text) > 1
    latents = state.latents.float()
    (name,) = stage.models
    bar = tqdm(total=p["num_inference_steps"], desc="denoising", unit="step",
               disable=not (state.progress and ctx.rank.rank == 0))
    # the plan's step cache (if any) wraps the DiT's block stack for this video, per CFG branch (runtime/skip_work.py)
    with ctx.placements[name].active() as dit, ctx.dispatch(name), skip_work(ctx, state, stage, name, dit, guided) as skips:
        dtype = next(dit.parameters()).dtype
        y = condition_latents(latents, state.image_latent if i2v else None).to(dtype)
        vision = state.family["vision_states"].to(dtype) if i2v else None
        cond = text_inputs(text[0], dtype)
        uncond = text_inputs(text[1], dtype) if guided else None
        for i in range(p["num_inference_steps"]):
            start = time.perf_counter()
            skips.begin_step(i)
            t = torch.tensor([timesteps[i]], dtype=torch.float32, device=ctx.device)
            x = latents.to(dtype)
            # a MeanFlow DiT (the step-distilled 480p I2V transformer's time_r_in) also sees the next timestep
            extra = {"t_r": torch.tensor([meanflow_t_r(timesteps, i)], device=ctx.device)} if p.get("meanflow") else {}
            if guided and ctx.rank.degree("cfg") == 2:  # cfg parallel: a branch per cfg rank, exchanged every step
                mine = cond if ctx.rank.coords["cfg"] == 0 else uncond
                velocity, v_u = ctx.rank.all_gather(dit(x, t, *mine, vision, y=y, **extra).float(), "cfg")
                velocity = v_u + scale * (velocity - v_u)
            else:
                velocity = dit(x, t, *cond, vision, y=y, **extra).float()
                if guided:
                    v_u = dit(x, t, *uncond, vision, y=y, **extra).float()
                    velocity = v_u + scale * (velocity - v_u)
            latents = update(i, velocity, latents)
            ctx.sync()
            state.timings.steps.append(time.perf_counter() - start)
            bar.update(1)
    bar.close()
    state.latents = latents
