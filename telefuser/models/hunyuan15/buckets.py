"""HunyuanVideo-1.5's resolution buckets (tencent/HunyuanVideo-1.5 `hyvideo/utils/data_utils.py` and the pipelines):
the frame sizes each resolution generates, how a requested aspect ratio or a reference image picks one, and how the
reference image is fitted to it."""

from __future__ import annotations

# The bucket arithmetic lives in the schema (the compiler records the sizes in the plan); its names stay importable here.
from telefuser.schema.buckets import (BUCKET_BASE_SIZE, BUCKET_STRIDE, bucket_frame_size,  # noqa: F401
                                      closest_bucket, crop_size_buckets, sr_bucket_size)


def cover_and_crop(src_width: int, src_height: int, width: int, height: int) -> tuple[tuple[int, int], tuple[float, ...]]:
    """How the reference image is fitted to a width x height frame: resized (LANCZOS in the published code) to
    (resized_width, resized_height) covering the frame, then the centred box (left, top, right, bottom) cropped."""
    scale = max(width / src_width, height / src_height)
    rw, rh = int(round(src_width * scale)), int(round(src_height * scale))
    return (rw, rh), ((rw - width) / 2, (rh - height) / 2, (rw + width) / 2, (rh + height) / 2)
