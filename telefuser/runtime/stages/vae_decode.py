"""vae_decode: latents -> uint8 frames [F, H, W, 3] on the replica's lead (the VAE lives there only), or,
under VAE parallel, the tiled decode's tiles shared out over the replica's ranks and stitched on its lead."""

from __future__ import annotations

import torch

from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, timed


@register("vae_decode")
def vae_decode(ctx: StageContext, state: RunState, stage: Stage) -> None:
    parallel = stage.params.get("parallel_ranks", 1) > 1
    if not (ctx.rank.is_writer or parallel):
        return
    (name,) = stage.models
    tile_size = tuple(stage.params["tile_size"])
    with timed(state.timings, "decode", ctx):
        with ctx.placements[name].active() as vae, ctx.dispatch(name):
            dtype = next(vae.parameters()).dtype
            if stage.params.get("decoder") == "taehv":  # the TAEHV preview decoder: chunks of latent frames
                video = vae.decode(state.latents.to(dtype), chunk_frames=stage.params["chunk_frames"])
            elif parallel:
                from telefuser.distributed.vae_parallel import parallel_decode

                video = parallel_decode(vae, state.latents.to(dtype), ctx.rank.replica_group, tile_size)
            else:
                kwargs = {"tiled": True, "tile_size": tile_size} if stage.params["tiled"] else {}
                video = vae.decode(state.latents.to(dtype), **kwargs)
        if video is None:  # a rank that decoded tiles for its lead
            return
        # [-1, 1] -> uint8, [B, 3, F, H, W] -> [F, H, W, 3]
        pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        frames = pixels.permute(1, 2, 3, 0).contiguous()
        if stage.params.get("output") == "device_frames":  # the vfi stage next interpolates them where they are
            state.device_frames = frames
        else:
            state.frames = frames.cpu().numpy()
