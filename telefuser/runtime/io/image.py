"""The conditioning image of image-to-video plans: read and checked once, then fitted to the frame.

`as_image` takes what a user passes (`--image PATH`, or in Python a path, a PIL image or a numpy array
H x W x 3 uint8) and returns a `ConditioningImage`: RGB uint8 pixels, decoded and checked. Every way a file
can be wrong (missing, not an image, truncated, too small, too large) is a `ParameterError` naming the
file and what to do, so the CLI exits 2 before loading any model.

`fit_image` makes the video's first frame of the chosen width x height as Wan2.2's image-to-video does
(`wan/textimage2video.py`): scale to cover the frame with a Lanczos resize, keeping the aspect ratio, then
crop the centre. (Wan2.1's `image2video.py` instead derives the frame size from the image's own aspect
ratio; here the size is the plan's resolution x aspect ratio, so an image of another shape is cropped,
never squashed.) `to_pixels` maps it to [-1, 1] floats as Wan does (`TF.to_tensor(img).sub_(0.5).div_(0.5)`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from telefuser.errors import ParameterError
from telefuser.schema.resolution import RESOLUTION_TABLE

# Images over 64 megapixels (8000 x 8000) are refused from their header, before decoding: decoded they would take
# 192 MB of RGB, and the video is far smaller anyway (LARGEST_FRAME): a larger image adds nothing but memory.
MAX_PIXELS = 64_000_000
# The largest frame of any resolution and aspect ratio (schema/resolution.py): 1280x720.
LARGEST_FRAME = max((size for sizes in RESOLUTION_TABLE.values() for size in sizes.values()),
                    key=lambda s: s[0] * s[1])
MIN_SIDE = 16  # pixels per side: one DiT patch (VAE stride 8 x patch 2)
FORMATS = ("PNG", "JPEG", "WEBP")
HOW = "give a PNG, JPEG or WebP image (any size from 16x16 up to 64 megapixels)"


@dataclass(frozen=True, eq=False)
class ConditioningImage:
    """A checked RGB image: `pixels` uint8 [H, W, 3]; `source` names it in messages (a path, or what it was)."""

    pixels: np.ndarray
    source: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


def _check_size(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise ParameterError(
            f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels); images over "
            f"{MAX_PIXELS // 1_000_000} megapixels are refused (the video is at most "
            f"{LARGEST_FRAME[0]}x{LARGEST_FRAME[1]}, so the image is "
            "downscaled anyway): shrink it first, e.g. to 1920 pixels on the long side.")
    if min(width, height) < MIN_SIDE:
        raise ParameterError(
            f"{what} is {width}x{height}; each side must be at least {MIN_SIDE} pixels (one DiT patch) to make a first "
            f"frame from it: {HOW}.")


def read_image(path: str | os.PathLike, option: str = "--image") -> ConditioningImage:
    """Decode and check an image file (PNG, JPEG, WebP); EXIF orientation applied; converted to RGB."""
    what = f"{option} {str(path)!r}"
    file = Path(path)
    if not file.exists():
        raise ParameterError(f"{what}: no such file; {HOW}.")
    if file.is_dir():
        raise ParameterError(f"{what} is a folder, not an image file; {HOW}.")
    return decode(file, what, str(path))


def decode(source: Path | BinaryIO, what: str, name: str) -> ConditioningImage:
    """An image file, or uploaded bytes (telefuser-serve), decoded with every check: format, size before decoding,
    the whole file decoded, EXIF orientation, RGB. `what` starts each message, `name` is the image's `source`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(source) as image:  # reads the header only: the size is checked before decoding
            if image.format not in FORMATS:
                raise ParameterError(f"{what} is a {image.format} image; TeleFuser reads PNG, JPEG and WebP: convert it.")
            _check_size(*image.size, what)
            image.load()  # the whole file: a truncated or damaged one fails here
            # A phone photo's EXIF orientation: the frame is the image as viewers show it (Wan's generate.py ignores it).
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except ParameterError:
        raise
    except Image.DecompressionBombError as exc:
        raise ParameterError(f"{what} is over {MAX_PIXELS // 1_000_000} megapixels ({exc}); shrink it first.") from exc
    except UnidentifiedImageError as exc:
        raise ParameterError(f"{what} is not an image (no PNG, JPEG or WebP data); {HOW}.") from exc
    except PermissionError as exc:
        raise ParameterError(f"{what} cannot be read (permission denied); make it readable.") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ParameterError(f"{what} is damaged or truncated ({exc}); save it again or pick another file.") from exc
    return ConditioningImage(np.asarray(rgb, dtype=np.uint8).copy(), name)


def as_image(value: Any, option: str = "--image") -> ConditioningImage:
    """A path, a PIL image or a numpy array [H, W, 3] uint8 (RGB) -> checked ConditioningImage."""
    if isinstance(value, ConditioningImage):
        return value
    if isinstance(value, (str, os.PathLike)):
        if isinstance(value, str) and not value.strip():
            raise ParameterError(f"{option} is empty; {HOW}.")
        return read_image(value, option)
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
            raise ParameterError(f"image: a numpy array must be RGB uint8 of shape [height, width, 3], got "
                                 f"{value.dtype} {list(value.shape)}; convert it (e.g. PIL's Image.convert(\"RGB\")).")
        _check_size(value.shape[1], value.shape[0], "image (numpy array)")
        return ConditioningImage(np.ascontiguousarray(value), f"<numpy array {value.shape[1]}x{value.shape[0]}>")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(value, Image.Image):
        _check_size(*value.size, "image (PIL image)")
        return ConditioningImage(np.asarray(value.convert("RGB"), dtype=np.uint8).copy(),
                                 f"<PIL image {value.size[0]}x{value.size[1]}>")
    raise ParameterError(f"image must be a file path, a PIL image or a numpy array [height, width, 3] of uint8, "
                         f"got {type(value).__name__}.")


def fit_image(image: ConditioningImage, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: Lanczos-resized to cover width x height (aspect kept), centre-cropped."""
    from PIL import Image

    source = Image.fromarray(image.pixels)
    iw, ih = source.size
    scale = max(width / iw, height / ih)
    covered = (max(width, round(iw * scale)), max(height, round(ih * scale)))
    if covered != (iw, ih):
        source = source.resize(covered, Image.Resampling.LANCZOS)
    left, top = (covered[0] - width) // 2, (covered[1] - height) // 2
    return np.asarray(source.crop((left, top, left + width, top + height)), dtype=np.uint8)


def to_pixels(frame: np.ndarray):
    """uint8 [H, W, 3] -> float32 torch tensor [1, 3, H, W] in [-1, 1], as Wan computes it."""
    import torch

    return torch.from_numpy(np.array(frame, dtype=np.uint8)).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)
