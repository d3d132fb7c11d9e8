"""vae_decode: latents -> uint8 frames [F, H, W, 3], on rank 0 (the VAE lives there only)."""

from __future__ import annotations

import torch

from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, timed


@register("vae_decode")
def vae_decode(ctx: StageContext, state: RunState, stage: Stage) -> None:
    if not ctx.rank.is_writer:
        return
    (name,) = stage.models
    with timed(state.timings, "decode", ctx):
        with ctx.placements[name].active() as vae, ctx.dispatch(name):
            dtype = next(vae.parameters()).dtype
            kwargs = {"tiled": True, "tile_size": tuple(stage.params["tile_size"])} if stage.params["tiled"] else {}
            video = vae.decode(state.latents.to(dtype), **kwargs)
        # [-1, 1] -> uint8, [B, 3, F, H, W] -> [F, H, W, 3]
        pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        state.frames = pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy()
