"""umT5 encoder key layouts: Wan's own (canonical here) and Hugging Face's UMT5EncoderModel.

Hugging Face's full seq2seq checkpoint (google/umt5-xxl, UMT5Model) holds the same
encoder keys next to `decoder.*` and `lm_head.weight`; those are dropped on the way in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

# (Wan, Hugging Face) per-block suffix pairs; gate.0 is the GELU-gated input projection (wi_0).
_BLOCK_PAIRS = [
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
]
_TOP_PAIRS = [("token_embedding.weight", "encoder.embed_tokens.weight"), ("norm.weight", "encoder.final_layer_norm.weight")]
_BLOCK = re.compile(r"^(blocks|encoder\.block)\.(\d+)\.(.+)$")
_HF_TIED_EMBEDDING = "shared.weight"  # the same tensor as encoder.embed_tokens.weight; often the only one saved
_HF_NOT_ENCODER = ("decoder.", "lm_head.")


def detect_layout(keys: Iterable[str]) -> str:
    """'wan' or 'hf', from the keys of a umT5 encoder state dict."""
    keys = list(keys)
    if any(k.startswith("encoder.block.") for k in keys):
        return "hf"
    if "token_embedding.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "wan"
    raise ValueError("these keys are neither Wan's umT5 encoder layout (token_embedding.weight, blocks.N.*) "
                     "nor Hugging Face's (encoder.block.N.*)")


def _convert(state: Mapping[str, T], to_hf: bool) -> dict[str, T]:
    src, dst = (0, 1) if to_hf else (1, 0)
    top = {p[src]: p[dst] for p in _TOP_PAIRS}
    block = {p[src]: p[dst] for p in _BLOCK_PAIRS}
    prefix = "encoder.block" if to_hf else "blocks"
    out: dict[str, T] = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if key in top:
            out[top[key]] = value
        elif m and m.group(3) in block:
            out[f"{prefix}.{m.group(2)}.{block[m.group(3)]}"] = value
        elif not to_hf and key == _HF_TIED_EMBEDDING:
            out.setdefault("token_embedding.weight", value)
        elif not to_hf and key.startswith(_HF_NOT_ENCODER):
            continue
        else:
            layout = "Wan" if to_hf else "Hugging Face"
            raise ValueError(f"unexpected key {key!r} in a umT5 encoder state dict of the {layout} layout")
    if to_hf:
        out[_HF_TIED_EMBEDDING] = out["encoder.embed_tokens.weight"]
    return out


def wan_to_hf(state: Mapping[str, T]) -> dict[str, T]:
    """Wan's layout -> UMT5EncoderModel's (shared.weight and encoder.embed_tokens.weight tied)."""
    return _convert(state, to_hf=True)


def hf_to_wan(state: Mapping[str, T]) -> dict[str, T]:
    return _convert(state, to_hf=False)


def to_wan_layout(state: Mapping[str, T]) -> dict[str, T]:
    return dict(state) if detect_layout(state.keys()) == "wan" else hf_to_wan(state)
