"""write_video: the container settings the Video carries (the file itself is written by `Video.save`)."""

from __future__ import annotations

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register


@register("write_video")
def write_video(ctx: StageContext, state: RunState, stage: Stage) -> None:
    p = stage.params
    if (p["container"], p["codec"], p["pixel_format"]) != ("mp4", "libx264", "yuv420p"):
        raise PlanError(f"this runtime writes mp4/libx264/yuv420p, not {p['container']}/{p['codec']}/"
                        f"{p['pixel_format']}; recompile the recipe with this TeleFuser version.")
    state.writer["fps"] = p["fps"]
