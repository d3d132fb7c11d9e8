"""hy15_image_encode: HunyuanVideo-1.5 image-to-video's two image inputs, from the fitted first frame (stage
image_load: [1, 3, H, W] in [-1, 1]): SigLIP's last hidden state of it (`vision_states`, after SigLIP's bicubic
antialiased resize to its image size) and its VAE latent (`image_latent` [1, C, 1, H/16, W/16], scaled), which the
denoise stage puts at latent frame 0 with a mask (`condition_latents`). Both are made on the dp replica's lead (SigLIP
and the VAE live there) and broadcast to the replica's other ranks, whose DiTs need them in both CFG branches.

With SR (`input` "sr_image": the image fitted to the SR frame by load_image_sr, `frame_sizes` that frame per base
frame "WxH") the same two are made of it for the SR DiT, as `state.family["sr_vision_states"]` / `["sr_image_latent"]`
(Tencent's SR pipeline encodes the reference image again at the SR size: compiler/hunyuan15_sr.py)."""

from __future__ import annotations

import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, sr_frame, timed

# input -> the outputs it makes (vision states, image latent)
FORMS = {"image": ["vision_states", "image_latent"], "sr_image": ["sr_vision_states", "sr_image_latent"]}


@register("hy15_image_encode")
def hy15_image_encode(ctx: StageContext, state: RunState, stage: Stage) -> None:
    siglip_name, vae_name = stage.models
    p = stage.params
    source = p.get("input", "image")
    if FORMS.get(source) != list(p.get("outputs", [])) or (source == "sr_image" and "frame_sizes" not in p):
        raise PlanError(f"the plan's stage {stage.name!r} makes {p.get('outputs')} of {source!r}, which this runtime "
                        "does not; recompile the recipe with this version.")
    width, height = state.params.width, state.params.height
    if source == "sr_image":
        width, height = sr_frame(stage, state)
    with timed(state.timings, "encode", ctx):
        if ctx.rank.is_writer:  # SigLIP and the VAE live on the replica's lead (image_load ran there)
            image = state.image if source == "image" else state.family.get(source)
            if image is None:
                raise PlanError(f"the plan's stage {stage.name!r} encodes the image, but no earlier stage loaded it; "
                                "recompile.")
            with ctx.placements[siglip_name].active() as siglip, ctx.dispatch(siglip_name):
                dtype = next(siglip.parameters()).dtype
                pixels = image.to(next(siglip.parameters()).device, dtype)
                vision = siglip(siglip.preprocess(pixels)).float().to(ctx.device).contiguous()
            with ctx.placements[vae_name].active() as vae, ctx.dispatch(vae_name):
                dtype = next(vae.parameters()).dtype
                latent = vae.encode(image.to(dtype)[:, :, None]).float().to(ctx.device).contiguous()
        else:  # the other ranks of the replica (cfg / sequence parallel): both arrive from the lead
            arch = {m.name: m.arch for m in ctx.plan.layer1_model_definition.models}
            image, vae = arch[siglip_name], arch[vae_name]
            tokens = (int(image["image_size"]) // int(image["patch_size"])) ** 2
            vision = torch.empty(1, tokens, int(image["dim"]), device=ctx.device)
            ratio = int(vae["spatial_ratio"])
            latent = torch.empty(1, int(vae["latent_channels"]), 1, int(height) // ratio, int(width) // ratio,
                                 device=ctx.device)
        vision, latent = ctx.rank.broadcast(vision), ctx.rank.broadcast(latent)
    if source == "image":
        state.family["vision_states"], state.image_latent = vision, latent
    else:
        state.family["sr_vision_states"], state.family["sr_image_latent"] = vision, latent
