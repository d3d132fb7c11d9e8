"""HunyuanVideo-1.5's published resolution buckets (tencent/HunyuanVideo-1.5 `hyvideo/utils/data_utils.py` and its
pipelines): the frame sizes each resolution generates and how a requested aspect ratio (T2V), a reference image
(I2V) or a low-resolution video (the SR stage) picks one. Here in the schema because the compiler records these
sizes in the plan (layer 3's `frame_sizes`, the SR stage's sizes) and must not import the models;
`telefuser.models.hunyuan15.buckets` re-exports them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

BUCKET_BASE_SIZE = {"480p": 640, "720p": 960, "1080p": 1440}  # the bucket area is base_size^2 pixels
BUCKET_STRIDE = 16


def crop_size_buckets(base_size: int, patch_size: int = BUCKET_STRIDE, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """The published buckets: every (a, b) in patches whose area is the most that fits base_size^2, aspect at most
    `max_ratio`, in the published order (generate_crop_size_list). The SR bucket map reads them as (w, h), the base
    pipeline's size choice as (h, w); the list holds both orientations."""
    patches = round((base_size / patch_size) ** 2)
    out, wp, hp = [], patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            out.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= patches:
            hp += 1
        else:
            wp -= 1
    return out


def closest_bucket(height: float, width: float, resolution: str = "480p") -> tuple[int, int]:
    """(height, width) of the `resolution` bucket whose aspect ratio (rounded to 5 decimals, as published) is closest
    to height / width; the first on a tie. T2V passes the requested aspect ratio (16:9 -> height 9, width 16), I2V
    the reference image's size."""
    if resolution not in BUCKET_BASE_SIZE:
        raise ValueError(f"resolution must be one of {', '.join(BUCKET_BASE_SIZE)}, got {resolution!r}")
    width_, height_ = closest_frame_size(image_buckets(resolution), width, height)
    return height_, width_


def image_buckets(resolution: str) -> list[tuple[int, int]]:
    """(width, height) of every published bucket of `resolution`, in the published order: the candidates Tencent's
    I2V pipeline picks the reference image's frame among (480p: 848x480 for 16:9, 480x848 for 9:16, 640x640, ...)."""
    return [(w, h) for h, w in crop_size_buckets(BUCKET_BASE_SIZE[resolution])]


def closest_frame_size(candidates: Sequence[Sequence[int]], width: float, height: float) -> tuple[int, int]:
    """The (width, height) among `candidates` whose height / width, rounded to 5 decimals, is closest to height /
    width of the image; the first on a tie (Tencent's I2V rule: `get_closest_ratio` over the bucket list's rounded
    ratios, the absolute difference of the h / w ratios, numpy's argmin)."""
    if not candidates:
        raise ValueError("no candidate frame sizes to pick from")
    target = float(height) / float(width)
    diffs = [abs(round(float(h) / float(w), 5) - target) for w, h in candidates]
    w, h = candidates[diffs.index(min(diffs))]
    return int(w), int(h)


def bucket_frame_size(resolution: str, aspect_ratio: str) -> Optional[tuple[int, int]]:
    """(width, height) that HunyuanVideo-1.5 generates for a resolution and an aspect ratio such as '16:9' (480p
    16:9: 848x480), or None where the resolution has no published bucket (144p, 704p: TeleFuser's table then)."""
    if resolution not in BUCKET_BASE_SIZE:
        return None
    w_ratio, h_ratio = (int(v) for v in aspect_ratio.split(":"))
    height, width = closest_bucket(h_ratio, w_ratio, resolution)
    return width, height


def sr_bucket_size(width: int, height: int, target_resolution: str) -> tuple[int, int]:
    """(width, height) of the SR video for a low-resolution width x height one: the `target_resolution` bucket of the
    closest aspect ratio, the first on a tie (the published BucketMap; 480p 848x480 -> 720p 1280x720)."""
    if target_resolution not in BUCKET_BASE_SIZE:
        raise ValueError(f"the SR target resolution must be one of {', '.join(BUCKET_BASE_SIZE)}, got "
                         f"{target_resolution!r}")
    ratio = float(width) / float(height)
    hr = crop_size_buckets(BUCKET_BASE_SIZE[target_resolution])
    diffs = [abs(float(w) / float(h) - ratio) for w, h in hr]
    return hr[diffs.index(min(diffs))]
