"""image_encode: CLIP's tokens of the fitted first frame (Wan2.1 image-to-video's `clip_fea`), on each dp
replica's lead (the image encoder lives there) and broadcast to the replica's other ranks."""

from __future__ import annotations

import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, timed


@register("image_encode")
def image_encode(ctx: StageContext, state: RunState, stage: Stage) -> None:
    if stage.params.get("features", "penultimate_block") != "penultimate_block":
        raise PlanError(f"the plan's stage {stage.name!r} asks for CLIP features {stage.params['features']!r}; this "
                        "runtime gives the penultimate block's tokens (Wan2.1's); recompile the recipe.")
    (name,) = stage.models
    with timed(state.timings, "encode", ctx):
        if ctx.rank.is_writer:
            if state.image is None:
                raise PlanError(f"the plan's stage {stage.name!r} comes before any image_load stage; recompile the recipe.")
            placement = ctx.placements[name]
            with placement.active() as encoder, ctx.dispatch(name):
                # Preprocessing (bicubic resize to the tower's size, CLIP mean/std) happens inside, in float32; on
                # the model's device (the CPU under run_on_cpu), then to the compute device.
                features = encoder(state.image.to(placement.device)).float().to(ctx.device).contiguous()
        else:  # the encoder lives on the replica's lead; its output arrives here
            arch = next(m for m in ctx.plan.layer1_model_definition.models if m.name == name).arch
            tokens = (arch["image_size"] // arch["patch_size"]) ** 2 + 1
            features = torch.empty((1, tokens, arch["dim"]), dtype=torch.float32, device=ctx.device)
        state.clip_fea = ctx.rank.broadcast(features)
