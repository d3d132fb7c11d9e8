"""hy15_sr_upsample + hy15_sr: HunyuanVideo-1.5's super-resolution stage (tencent/HunyuanVideo-1.5 `hunyuan_video_sr_pipeline.py`; the
pieces are `telefuser.models.hunyuan15.sr`'s, tested against a float64 evaluation of the published SR forward).

From the base stage's final latent `lq` [1, C, T, h, w]:
1. the SR frame is the plan's `frame_sizes["WxH"]` of the run's base frame (the SR resolution's bucket closest to
   its aspect ratio, recorded for every base frame the plan may generate, "auto"'s candidates included); each
   latent frame is resized bilinearly to it over the VAE's spatial ratio and refined by the latent upsampler;
2. it is noised: (1 - s) lq + s noise, s = lq_noise_strength, the noise drawn on the CPU from the run's seeded
   generator (after the base latents), then the SR stage's initial latents from the same generator;
3. flow-matching Euler over the SR schedule (the base stage's grid with the SR shift and step count), one SR DiT
   call per step (guidance 1) on the prompt's text inputs, conditioning [zeros + task mask 0 (T2V), lq, ones] while
   t >= 1000 s and with the low-resolution channels zeroed after, MeanFlow's t_r = the next step's timestep (0 last).
   I2V (`condition` "i2v"): the condition latent is the reference image's latent at the SR frame (encode_image_sr)
   at latent frame 0 with the task mask 1 there, kept after the switch, and the SR DiT gets SigLIP's tokens of that
   image (Tencent's SR pipeline: get_image_condition_latents at the SR size, _prepare_vision_states, mask_type i2v).
The decode stage then decodes the SR latent."""

from __future__ import annotations

import time

import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from ..skip_work import skip_work
from .base import RunState, StageContext, register, sr_frame
from .hy15_denoise import check_schedule, sampler, text_inputs


@register("hy15_sr_upsample")
def hy15_sr_upsample(ctx: StageContext, state: RunState, stage: Stage) -> None:
    """Steps 1 and 2: the noised, upsampled low-resolution latent and the SR stage's initial latents."""
    from telefuser.models.hunyuan15.sr import noise_lq_latent, upsample_lq_latent

    p = stage.params
    (up_name,) = stage.models
    if p.get("generator") != "cpu" or p.get("resize") != "bilinear":
        raise PlanError(f"the plan's stage {stage.name!r} asks for a {p.get('resize')!r} resize / {p.get('generator')!r} "
                        "generator, which this runtime does not run; recompile with this version.")
    if state.generator is None or state.latents is None:
        raise PlanError(f"the plan's stage {stage.name!r} needs the base stage's latents; recompile.")
    width, height = sr_frame(stage, state)
    space = int(p["spatial_ratio"])
    with ctx.placements[up_name].active() as upsampler, ctx.dispatch(up_name):
        lq = state.latents.float().to(next(upsampler.parameters()).device)
        upsampled = upsample_lq_latent(lq, (height // space, width // space), upsampler).float().to(ctx.device)
    noise = torch.randn(upsampled.shape, generator=state.generator, dtype=torch.float32).to(ctx.device)
    state.family["lq"] = noise_lq_latent(upsampled, float(p["lq_noise_strength"]), noise=noise)
    state.latents = torch.randn(upsampled.shape, generator=state.generator, dtype=torch.float32).to(ctx.device)


@register("hy15_sr")
def hy15_sr(ctx: StageContext, state: RunState, stage: Stage) -> None:
    """Step 3: the SR DiT's sampling from the SR stage's initial latents."""
    from tqdm.auto import tqdm

    from telefuser.models.hunyuan15.sr import meanflow_t_r, sr_condition, sr_condition_for

    check_schedule(stage)
    p = stage.params
    (dit_name,) = stage.models
    if not p.get("meanflow") or float(p["cfg_scale"]) != 1.0:
        raise PlanError(f"the plan's stage {stage.name!r} asks for an SR stage this runtime does not run (meanflow "
                        f"{p.get('meanflow')}, cfg_scale {p['cfg_scale']}); recompile.")
    strength = float(p["lq_noise_strength"])
    condition_kind = p.get("condition", "t2v")
    if condition_kind not in ("t2v", "i2v"):
        raise PlanError(f"the plan's stage {stage.name!r} conditions on {condition_kind!r}; recompile with this version.")
    i2v = condition_kind == "i2v"
    text = state.family.get("text")
    if not text or "lq" not in state.family:
        raise PlanError(f"the plan's stage {stage.name!r} needs the text inputs and the upsampled latent of earlier "
                        "stages; recompile.")
    if i2v and ("sr_image_latent" not in state.family or "sr_vision_states" not in state.family):
        raise PlanError(f"the plan's stage {stage.name!r} needs the image's latent and SigLIP tokens at the SR frame, "
                        "but no earlier stage made them; recompile.")
    latents = state.latents
    timesteps, update = sampler(p, state.generator, ctx.device)  # Euler on the SR grid (check_schedule)
    bar = tqdm(total=p["num_inference_steps"], desc="super-resolution", unit="step",
               disable=not (state.progress and ctx.rank.rank == 0))
    # the plan's step cache (if any) wraps the SR DiT's block stack for this video, one branch (runtime/skip_work.py)
    with ctx.placements[dit_name].active() as dit, ctx.dispatch(dit_name), \
            skip_work(ctx, state, stage, dit_name, dit, False) as skips:
        dtype = next(dit.parameters()).dtype
        condition, zero = sr_condition(latents, state.family["lq"], state.family["sr_image_latent"] if i2v else None)
        vision = state.family["sr_vision_states"].to(dtype) if i2v else None
        cond = text_inputs(text[0], dtype)
        for i in range(p["num_inference_steps"]):
            start = time.perf_counter()
            skips.begin_step(i)
            t = torch.tensor([timesteps[i]], dtype=torch.float32, device=ctx.device)
            y = sr_condition_for(timesteps[i], condition, zero, strength).to(dtype)
            t_r = torch.tensor([meanflow_t_r(timesteps, i)], dtype=torch.float32, device=ctx.device)
            velocity = dit(latents.to(dtype), t, *cond, vision, y=y, t_r=t_r).float()
            latents = update(i, velocity, latents)
            ctx.sync()
            state.timings.steps.append(time.perf_counter() - start)
            bar.update(1)
    bar.close()
    state.latents = latents
