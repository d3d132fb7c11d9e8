"""The stage kinds a plan may list, one module each, registered by kind (`STAGES[kind]`)."""

from __future__ import annotations

from .base import STAGES, RunState, StageContext
from . import denoise, noise, text_encode, vae_decode, write_video  # noqa: F401  (each registers its kind)

__all__ = ["STAGES", "RunState", "StageContext"]
