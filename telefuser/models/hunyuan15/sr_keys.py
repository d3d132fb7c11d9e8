"""The SR latent upsamplers' key layout: Tencent's only (`upsampler/720p_sr_distilled`, `upsampler/1080p_sr_distilled`;
diffusers publishes none)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if "in_conv.conv.weight" in keys or "conv_in.conv.weight" in keys:
        return "tencent"
    raise ValueError("these keys are not a HunyuanVideo-1.5 SR upsampler (no in_conv/conv_in)")


def to_tencent_layout(state: Mapping[str, T]) -> dict[str, T]:
    detect_layout(state.keys())
    return dict(state)


to_wan_layout = to_tencent_layout  # the registry's contract name: to the canonical official layout
