"""Qwen2.5-VL language-model key layouts -> the bare Hugging Face Qwen2 names `Qwen25VLTextEncoder` uses.

One layout ("hf") under three spellings: the hub checkpoint (Qwen/Qwen2.5-VL-7B-Instruct, copied as
tencent/HunyuanVideo-1.5's `text_encoder/llm`: `model.layers.N.*`, `model.embed_tokens`, `model.norm`, `lm_head`,
`visual.*`), transformers >= 4.52's `model.language_model.*` / `model.visual.*`, and diffusers' saved
`Qwen2_5_VLTextModel` (bare `layers.N.*`). The vision tower and the LM head are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_UNUSED = ("visual.", "model.visual.", "lm_head.")


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.endswith("embed_tokens.weight") for k in keys) and any(".self_attn.q_proj." in k for k in keys):
        return "hf"
    raise ValueError("these keys are not a Qwen2/Qwen2.5-VL language model (no embed_tokens, no self_attn.q_proj)")


def to_text_layout(state: Mapping[str, T]) -> dict[str, T]:
    detect_layout(state.keys())
    out: dict[str, T] = {}
    for key, value in state.items():
        if key.startswith(_UNUSED):
            continue
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


to_wan_layout = to_text_layout  # the registry's contract name: to the canonical layout
