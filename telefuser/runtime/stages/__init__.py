"""The stage kinds a plan may list, one module each, registered by kind (`STAGES[kind]`)."""

from __future__ import annotations

from .base import STAGES, RunState, StageContext
from . import (denoise, image_encode, image_load, noise, text_encode, vae_decode, vae_encode,  # noqa: F401
               write_video)  # (each registers its kind)
from . import vfi  # noqa: F401,E402  (frame interpolation, issue 19)
from . import hy15_denoise, hy15_image_encode, hy15_sr, hy15_text_encode  # noqa: F401  (HunyuanVideo-1.5's kinds)

__all__ = ["STAGES", "RunState", "StageContext"]
