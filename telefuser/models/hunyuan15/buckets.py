"""HunyuanVideo-1.5's resolution buckets (tencent/HunyuanVideo-1.5 `hyvideo/utils/data_utils.py` and the pipelines):
the frame sizes each resolution generates, how a requested aspect ratio or a reference image picks one, and how the
reference image is fitted to it."""

from __future__ import annotations

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
    buckets = crop_size_buckets(BUCKET_BASE_SIZE[resolution])
    target = float(height) / float(width)
    diffs = [abs(round(float(h) / float(w), 5) - target) for h, w in buckets]
    return buckets[diffs.index(min(diffs))]


def cover_and_crop(src_width: int, src_height: int, width: int, height: int) -> tuple[tuple[int, int], tuple[float, ...]]:
    """How the reference image is fitted to a width x height frame: resized (LANCZOS in the published code) to
    (resized_width, resized_height) covering the frame, then the centred box (left, top, right, bottom) cropped."""
    scale = max(width / src_width, height / src_height)
    rw, rh = int(round(src_width * scale)), int(round(src_height * scale))
    return (rw, rh), ((rw - width) / 2, (rh - height) / 2, (rw + width) / 2, (rh + height) / 2)
