"""noise: the seeded initial latents, drawn on the CPU so every device and rank draws the same."""

from __future__ import annotations

import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register


@register("noise")
def noise(ctx: StageContext, state: RunState, stage: Stage) -> None:
    p = stage.params
    if p["generator"] != "cpu":
        raise PlanError(f"the plan asks for a {p['generator']!r} noise generator; this runtime draws on the CPU.")
    space, time_ratio = p["spatial_ratio"], p["temporal_ratio"]
    if p["num_frames"] % time_ratio != 1 % time_ratio or state.params.height % space or state.params.width % space:
        raise PlanError(
            f"{p['num_frames']} frames of {state.params.width}x{state.params.height} do not fit the VAE's "
            f"{time_ratio}x{space}x{space} compression; pick another resolution and recompile."
        )
    shape = (1, p["latent_channels"], (p["num_frames"] - 1) // time_ratio + 1,
             state.params.height // space, state.params.width // space)
    state.generator = torch.Generator("cpu").manual_seed(state.params.seed)
    state.latents = torch.randn(shape, generator=state.generator, dtype=torch.float32).to(ctx.device)
