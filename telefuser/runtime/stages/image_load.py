"""image_load: the conditioning image fitted to the chosen frame (Lanczos resize to cover, centre crop) and mapped
to [-1, 1], on each dp replica's lead: the models that read it (CLIP, the VAE encoder) live there. An `optional`
stage (Wan2.2 TI2V with an optional image) does nothing on a run without an image. With `frame_sizes` (HunyuanVideo-1.5
I2V + SR: the base frame "WxH" -> the SR frame) the image is fitted to that frame instead, into `output` "sr_image"
(`state.family`), for the SR stage's own image encode."""

from __future__ import annotations

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, sr_frame, timed

FITS = {("cover_center_crop", "lanczos")}
OUTPUTS = ("image", "sr_image")


@register("image_load")
def image_load(ctx: StageContext, state: RunState, stage: Stage) -> None:
    from telefuser.runtime.io.image import fit_image, to_pixels

    p = stage.params
    if (p["fit"], p["resample"]) not in FITS or list(p["value_range"]) != [-1, 1]:
        raise PlanError(f"the plan's stage {stage.name!r} fits the image with {p['fit']}/{p['resample']} to "
                        f"{p['value_range']}, which this runtime does not do; recompile the recipe with this version.")
    output = p.get("output", "image")
    sizes = p.get("frame_sizes")
    if output not in OUTPUTS or (output == "sr_image") != (sizes is not None):
        raise PlanError(f"the plan's stage {stage.name!r} writes the image to {output!r} (frame sizes {sizes}), which "
                        "this runtime does not; recompile the recipe with this version.")
    if state.params.image is None:
        if p.get("optional"):  # TI2V run without an image: text-to-video
            return
        raise PlanError(f"the plan's stage {stage.name!r} needs an image, but the plan declares no image parameter; "
                        "recompile the recipe (an image-to-video recipe has a [layer3.image]).")
    if not ctx.rank.is_writer:
        return
    width, height = state.params.width, state.params.height
    if sizes is not None:
        width, height = sr_frame(stage, state)
    with timed(state.timings, "encode", ctx):
        pixels = to_pixels(fit_image(state.params.image, int(width), int(height))).to(ctx.device)
    if output == "image":
        state.image = pixels
    else:
        state.family[output] = pixels
