"""SigLIP vision tower key layout: Hugging Face's (`SiglipVisionModel`: `vision_model.*`; a full `SiglipModel`
also holds `text_model.*`, `logit_scale`, `logit_bias`), mapped to the bare SiglipVisionTransformer names
`SigLIPVisionEncoder` uses; the attention-pooling head and the text tower are dropped."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

_UNUSED = ("head.", "text_model.", "logit_scale", "logit_bias", "embeddings.position_ids")


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.endswith("embeddings.patch_embedding.weight") for k in keys) and any(
            "encoder.layers.0.self_attn.q_proj." in k for k in keys):
        return "hf"
    raise ValueError("these keys are not a SigLIP vision tower (no embeddings.patch_embedding, encoder.layers)")


def to_vision_layout(state: Mapping[str, T]) -> dict[str, T]:
    detect_layout(state.keys())
    out: dict[str, T] = {}
    for key, value in state.items():
        key = key[len("vision_model."):] if key.startswith("vision_model.") else key
        if not key.startswith(_UNUSED):
            out[key] = value
    return out


to_wan_layout = to_vision_layout  # the registry's contract name: to the canonical layout
