"""vae_encode: the image's VAE conditioning, on each dp replica's lead and broadcast to the others: Wan2.1 (and
Wan2.2 A14B) image-to-video's `y` (condition "first_frame"), or Wan2.2 TI2V's `image_latent` (condition
"image_latent": the VAE latent of the image alone, one latent frame [1, z_dim, 1, H/s, W/s], which the denoise
stage puts in place of the first latent frame).

Condition "first_frame":

The Wan VAE encodes the video [image, num_frames - 1 zero frames] (the causal encoder sees the image first, so
the zero frames' latents carry it too); in front of those z_dim latent channels go `mask_channels` (= the
temporal ratio, 4) mask channels: the mask is built on the pixel frame axis, 1 for the first frame and 0 for the
rest, the first frame repeated temporal_ratio times so the 1 + 4k frames fold into 4 channels per latent frame.
So the first latent frame's 4 channels are 1 and every later one's 0: y = [mask (4), latents (z_dim)], which the
DiT concatenates after its noise channels (4 + 16 + 16 = 36 input channels for Wan2.1)."""

from __future__ import annotations

import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, timed


def first_frame_mask(num_frames: int, temporal_ratio: int, height: int, width: int) -> torch.Tensor:
    """[1, temporal_ratio, latent_frames, height, width] float32: 1 on the first latent frame, 0 after."""
    if (num_frames - 1) % temporal_ratio:
        raise ValueError(f"{num_frames} frames are not 1 + {temporal_ratio}k")
    per_pixel_frame = torch.zeros(1, num_frames + temporal_ratio - 1, height, width)  # frame 0 repeated
    per_pixel_frame[:, :temporal_ratio] = 1.0
    latent_frames = (num_frames - 1) // temporal_ratio + 1
    return per_pixel_frame.view(1, latent_frames, temporal_ratio, height, width).transpose(1, 2)


def _encoded_on_lead(ctx: StageContext, state: RunState, stage: Stage, frames: int,
                     shape: tuple[int, int, int]) -> torch.Tensor:
    """Latents [1, z_dim, *shape] float32 of the video [image, frames - 1 zero frames], encoded on the dp
    replica's lead (the VAE lives there) and broadcast to the replica's other ranks."""
    (name,) = stage.models
    width, height = state.params.width, state.params.height
    if ctx.rank.is_writer:
        if state.image is None:
            raise PlanError(f"the plan's stage {stage.name!r} comes before any image_load stage; recompile the recipe.")
        with ctx.placements[name].active() as vae, ctx.dispatch(name):
            dtype = next(vae.parameters()).dtype
            image = state.image.to(ctx.device, dtype)[:, :, None]  # [1, 3, 1, H, W]
            video = torch.cat([image, image.new_zeros(1, 3, frames - 1, height, width)], dim=2)
            latents = vae.encode(video).float().contiguous()
            del video
        if tuple(latents.shape[2:]) != shape:
            raise PlanError(f"the VAE encoded {frames} frame(s) of {width}x{height} to latents of shape "
                            f"{tuple(latents.shape)}, not {shape}; the plan's VAE does not fit its stage "
                            "parameters: recompile the recipe.")
    else:  # the latents arrive here
        z_dim = next(m for m in ctx.plan.layer1_model_definition.models if m.name == name).arch["z_dim"]
        latents = torch.empty((1, z_dim, *shape), dtype=torch.float32, device=ctx.device)
    return ctx.rank.broadcast(latents)


def image_latent(ctx: StageContext, state: RunState, stage: Stage) -> None:
    """TI2V: the VAE latent of the fitted image as a one-frame video (Wan2.2's `vae.encode([img])`)."""
    p = stage.params
    if state.params.image is None:
        if p.get("optional"):  # a run without an image: text-to-video
            return
        raise PlanError(f"the plan's stage {stage.name!r} encodes the image, but this run has none; pass --image.")
    space, width, height = p["spatial_ratio"], state.params.width, state.params.height
    if p["num_frames"] != 1 or height % space or width % space:
        raise PlanError(f"the plan's stage {stage.name!r} encodes {p['num_frames']} frame(s) of {width}x{height}, which "
                        f"does not fit the VAE's {space}x{space} compression of one image; recompile the recipe.")
    with timed(state.timings, "encode", ctx):
        state.image_latent = _encoded_on_lead(ctx, state, stage, 1, (1, height // space, width // space))


@register("vae_encode")
def vae_encode(ctx: StageContext, state: RunState, stage: Stage) -> None:
    p = stage.params
    if p["condition"] == "image_latent":
        return image_latent(ctx, state, stage)
    if p["condition"] != "first_frame" or p["mask_channels"] != p["temporal_ratio"]:
        raise PlanError(f"the plan's stage {stage.name!r} asks for a {p['condition']!r} condition with "
                        f"{p.get('mask_channels')} mask channels; this runtime makes Wan2.1's first-frame condition and "
                        "Wan2.2 TI2V's image latent. "
                        "Recompile the recipe with this version.")
    frames, time_ratio, space = p["num_frames"], p["temporal_ratio"], p["spatial_ratio"]
    width, height = state.params.width, state.params.height
    if (frames - 1) % time_ratio or height % space or width % space:
        raise PlanError(f"{frames} frames of {width}x{height} do not fit the VAE's {time_ratio}x{space}x{space} "
                        "compression; pick another resolution and recompile.")
    latent_shape = ((frames - 1) // time_ratio + 1, height // space, width // space)
    with timed(state.timings, "encode", ctx):
        latents = _encoded_on_lead(ctx, state, stage, frames, latent_shape)
        # The mask is cheap and the same on every rank: made where it is used rather than broadcast.
        mask = first_frame_mask(frames, time_ratio, *latent_shape[1:]).to(latents.device)
        state.y = torch.cat([mask, latents], dim=1).contiguous()
