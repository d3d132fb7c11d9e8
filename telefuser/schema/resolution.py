"""Resolution x aspect ratio -> (width, height) in pixels.

An explicit table rather than a formula: the 16:9 entries are the sizes Wan was
trained at (832x480, 1280x720), and every side is a multiple of 16 (VAE
stride 8 x DiT patch 2). Other ratios keep the area at or under the 16:9 one.

704p is Wan2.2 TI2V-5B's 720p (1280*704 and 704*1280, its only sizes): the Wan2.2 VAE
compresses space 16x, so with the DiT's 2x2 patch every side is a multiple of 32,
which 720 is not. Its other ratios are multiples of 32 too (1:1 928x928, 4:3 1024x768).
The compiler refuses a choice whose sides do not fit the plan's VAE and patch. 1080p is there for HunyuanVideo-1.5's
1080p SR stage, which generates its published buckets (16:9: 1904x1072); the table's 1080p row (1920x1088) is what a
pipeline without buckets would generate.

HunyuanVideo-1.5's pipelines generate its published buckets instead where a resolution has them
(`family_frame_size`, `buckets.py`: 480p 16:9 is 848x480 there).
"""

from __future__ import annotations

from .buckets import BUCKET_BASE_SIZE, bucket_frame_size, closest_frame_size, image_buckets
from .enums import FIXED_ASPECT_RATIOS, HUNYUAN15_PIPELINES, AspectRatio, Resolution

RESOLUTION_TABLE: dict[Resolution, dict[AspectRatio, tuple[int, int]]] = {
    Resolution.P144: {
        AspectRatio.R16_9: (256, 144),
        AspectRatio.R9_16: (144, 256),
        AspectRatio.R1_1: (192, 192),
        AspectRatio.R4_3: (192, 144),
        AspectRatio.R3_4: (144, 192),
    },
    Resolution.P480: {
        AspectRatio.R16_9: (832, 480),
        AspectRatio.R9_16: (480, 832),
        AspectRatio.R1_1: (624, 624),
        AspectRatio.R4_3: (640, 480),
        AspectRatio.R3_4: (480, 640),
    },
    Resolution.P720: {
        AspectRatio.R16_9: (1280, 720),
        AspectRatio.R9_16: (720, 1280),
        AspectRatio.R1_1: (960, 960),
        AspectRatio.R4_3: (1088, 816),
        AspectRatio.R3_4: (816, 1088),
    },
    Resolution.P704: {
        AspectRatio.R16_9: (1280, 704),
        AspectRatio.R9_16: (704, 1280),
        AspectRatio.R1_1: (928, 928),
        AspectRatio.R4_3: (1024, 768),
        AspectRatio.R3_4: (768, 1024),
    },
    Resolution.P1080: {  # no Wan model is published at 1080p; 1088 = 1080 rounded up to a multiple of 16
        AspectRatio.R16_9: (1920, 1088),
        AspectRatio.R9_16: (1088, 1920),
        AspectRatio.R1_1: (1440, 1440),
        AspectRatio.R4_3: (1664, 1248),
        AspectRatio.R3_4: (1248, 1664),
    },
}


def frame_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(width, height) for a resolution name and an aspect ratio such as '16:9'."""
    try:
        return RESOLUTION_TABLE[Resolution(resolution)][AspectRatio(aspect_ratio)]
    except (ValueError, KeyError) as exc:  # KeyError: "auto", which has no one size (frame_candidates)
        valid_res = ", ".join(r.value for r in Resolution)
        valid_ar = ", ".join(a.value for a in FIXED_ASPECT_RATIOS)
        raise ValueError(
            f"unknown resolution {resolution!r} or aspect ratio {aspect_ratio!r}: "
            f"resolutions are {valid_res}; aspect ratios are {valid_ar}"
        ) from exc


def family_frame_size(pipeline: str, resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(width, height) a pipeline generates for a resolution and an aspect ratio: HunyuanVideo-1.5's published
    bucket where its resolution has them (480p 16:9: 848x480, what Tencent's code generates), else the table. The
    compiler records these in the plan (`layer3_user_interface.frame_sizes`), which the runtime then follows."""
    if str(aspect_ratio) == AspectRatio.AUTO.value:
        raise ValueError("aspect ratio 'auto' has no one frame size: the reference image picks one of "
                         "frame_candidates(pipeline, resolution, 'auto')")
    if _is_hy15(pipeline):
        bucket = bucket_frame_size(str(resolution), str(aspect_ratio))
        if bucket is not None:
            return bucket
    return frame_size(str(resolution), str(aspect_ratio))


def _is_hy15(pipeline: str) -> bool:
    return str(pipeline) in {p.value for p in HUNYUAN15_PIPELINES}


def frame_candidates(pipeline: str, resolution: str, aspect_ratio: str) -> list[tuple[int, int]]:
    """Every (width, height) a run at this resolution and aspect ratio choice may generate: the one size of a fixed
    ratio (`family_frame_size`), or for "auto" (image-to-video) the sizes the reference image's ratio picks among:
    HunyuanVideo-1.5's published buckets of the resolution (all of them, in the published order, as Tencent's I2V
    pipeline picks), else the resolution table's row (one size per fixed ratio, in the table's order). The compiler
    records the candidates in the plan, sizes its memory estimate on the largest and checks each against the VAE and
    the patch; the runtime picks one with `closest_frame_size`."""
    if str(aspect_ratio) != AspectRatio.AUTO.value:
        return [family_frame_size(pipeline, resolution, aspect_ratio)]
    if _is_hy15(pipeline) and str(resolution) in BUCKET_BASE_SIZE:
        return image_buckets(str(resolution))
    return [RESOLUTION_TABLE[Resolution(resolution)][a] for a in FIXED_ASPECT_RATIOS]


def typical_frame_size(pipeline: str, resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """One size standing for the choice where a single one is needed at compile time (the default frame of a step
    cache's fit, a sparse mask's density): the size itself, or for "auto" the candidate a 16:9 image picks."""
    return closest_frame_size(frame_candidates(pipeline, resolution, aspect_ratio), 16, 9)


def frame_key(width: int, height: int) -> str:
    """A frame's key where the plan maps a base frame to another size (HunyuanVideo-1.5's SR stages' `frame_sizes`:
    "848x480" -> the SR frame); the runtime looks its run's base frame up by it."""
    return f"{int(width)}x{int(height)}"
