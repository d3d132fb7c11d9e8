"""HunyuanVideo-1.5's byT5 glyph encoder (Glyph-SDXL-v2's byT5-small: a T5 v1.1 encoder on bytes, 1472 wide,
12 layers of 6 heads, gated tanh-GELU, one relative-position table shared by all layers) as
`telefuser.models.t5.umt5.UMT5Encoder` with `shared_pos=True`, whose layout (Wan's umT5 names) is the target here.

Layouts:
- "hf": a Hugging Face T5 encoder (diffusers' saved `T5EncoderModel`: `shared.weight`, `encoder.block.N.*`,
  `encoder.final_layer_norm.weight`; a full `T5ForConditionalGeneration` file, whose decoder and LM head are dropped);
- "glyph": Tencent's / Glyph-SDXL-v2's `byt5_model.pt` state dict (`module.text_tower.encoder.` + the encoder
  stack's own names: `embed_tokens.weight`, `block.N.*`, `final_layer_norm.weight`; read with
  torch.load(weights_only=True), its `state_dict` entry).
The vocabulary is byT5's 384 plus the color and font tokens Tencent adds (the embedding rows say how many).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

_GLYPH_PREFIX = "module.text_tower.encoder."
_BLOCK = re.compile(r"^block\.(\d+)\.(.+)$")
_INNER = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
_SHARED_BIAS = "layer.0.SelfAttention.relative_attention_bias.weight"


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith("encoder.block.") for k in keys):
        return "hf"
    if any(k.startswith(_GLYPH_PREFIX + "block.") or k.startswith("block.") for k in keys):
        return "glyph"
    raise ValueError("these keys are not a T5 encoder (no encoder.block.N / block.N)")


def _stack(state: Mapping[str, T]) -> dict[str, T]:
    """The encoder stack's own names (embed_tokens, block.N.*, final_layer_norm), whatever the file's prefix."""
    out: dict[str, T] = {}
    for key, value in state.items():
        for prefix in ("encoder.", _GLYPH_PREFIX, ""):
            if key.startswith(prefix):
                out.setdefault(key[len(prefix):], value)
                break
    if "embed_tokens.weight" not in out and "shared.weight" in state:
        out["embed_tokens.weight"] = state["shared.weight"]  # tied: often the only copy saved
    return out


def to_umt5_layout(state: Mapping[str, T]) -> dict[str, T]:
    detect_layout(state.keys())
    out: dict[str, T] = {}
    for key, value in _stack(state).items():
        m = _BLOCK.match(key)
        if key == "embed_tokens.weight":
            out["token_embedding.weight"] = value
        elif key == "final_layer_norm.weight":
            out["norm.weight"] = value
        elif m and m.group(2) == _SHARED_BIAS:
            if m.group(1) != "0":
                raise ValueError(f"block {m.group(1)} has its own position table: a umT5, not a (by)T5 encoder")
            out["pos_embedding.embedding.weight"] = value
        elif m and m.group(2) in _INNER:
            out[f"blocks.{m.group(1)}.{_INNER[m.group(2)]}"] = value
        # anything else (shared.weight, decoder.*, lm_head.*) is not the encoder's
    return out


def umt5_to_hf(state: Mapping[str, T]) -> dict[str, T]:
    """UMT5Encoder(shared_pos=True) names -> a Hugging Face T5EncoderModel's (the tiny files are written so)."""
    inner = {v: k for k, v in _INNER.items()}
    out: dict[str, T] = {}
    for key, value in state.items():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if key == "token_embedding.weight":
            out["shared.weight"] = value  # tied to encoder.embed_tokens.weight, which safetensors files omit
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif key == "pos_embedding.embedding.weight":
            out["encoder.block.0." + _SHARED_BIAS] = value
        elif m and m.group(2) in inner:
            out[f"encoder.block.{m.group(1)}.{inner[m.group(2)]}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} for a T5 encoder with a shared position table")
    return out


to_wan_layout = to_umt5_layout  # the registry's contract name: to the canonical layout
