"""hy15_image_encode: HunyuanVideo-1.5 image-to-video's two image inputs, from the fitted first frame (stage
image_load: [1, 3, H, W] in [-1, 1]): SigLIP's last hidden state of it (`vision_states`, after SigLIP's bicubic
antialiased resize to its image size) and its VAE latent (`image_latent` [1, C, 1, H/16, W/16], scaled), which the
denoise stage puts at latent frame 0 with a mask (`condition_latents`)."""

from __future__ import annotations

import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, timed


@register("hy15_image_encode")
def hy15_image_encode(ctx: StageContext, state: RunState, stage: Stage) -> None:
    siglip_name, vae_name = stage.models
    if list(stage.params.get("outputs", [])) != ["vision_states", "image_latent"]:
        raise PlanError(f"the plan's stage {stage.name!r} makes {stage.params.get('outputs')}, which this runtime does "
                        "not; recompile the recipe with this version.")
    if state.image is None:
        raise PlanError(f"the plan's stage {stage.name!r} encodes the image, but no earlier stage loaded it; recompile.")
    with timed(state.timings, "encode", ctx):
        with ctx.placements[siglip_name].active() as siglip, ctx.dispatch(siglip_name):
            dtype = next(siglip.parameters()).dtype
            pixels = state.image.to(next(siglip.parameters()).device, dtype)
            state.family["vision_states"] = siglip(siglip.preprocess(pixels)).float().to(ctx.device)
        with ctx.placements[vae_name].active() as vae, ctx.dispatch(vae_name):
            dtype = next(vae.parameters()).dtype
            state.image_latent = vae.encode(state.image.to(dtype)[:, :, None]).float().to(ctx.device)
