"""Wan DiT key layouts: Wan's own (canonical here) and diffusers' WanTransformer3DModel.

The mapping is a list of (Wan pattern, diffusers pattern) pairs over key
*prefixes*; `{i}` stands for a block index. Only names differ between the two
layouts: every tensor keeps its shape, so conversion is a rename.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

# Longest prefixes first where one is a prefix of another ("norm_k_img" before "norm_k").
_PREFIX_PAIRS: list[tuple[str, str]] = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("head.head.", "proj_out."),
    ("blocks.{i}.self_attn.q.", "blocks.{i}.attn1.to_q."),
    ("blocks.{i}.self_attn.k.", "blocks.{i}.attn1.to_k."),
    ("blocks.{i}.self_attn.v.", "blocks.{i}.attn1.to_v."),
    ("blocks.{i}.self_attn.o.", "blocks.{i}.attn1.to_out.0."),
    ("blocks.{i}.self_attn.norm_q.", "blocks.{i}.attn1.norm_q."),
    ("blocks.{i}.self_attn.norm_k.", "blocks.{i}.attn1.norm_k."),
    ("blocks.{i}.cross_attn.q.", "blocks.{i}.attn2.to_q."),
    ("blocks.{i}.cross_attn.k_img.", "blocks.{i}.attn2.add_k_proj."),
    ("blocks.{i}.cross_attn.v_img.", "blocks.{i}.attn2.add_v_proj."),
    ("blocks.{i}.cross_attn.norm_k_img.", "blocks.{i}.attn2.norm_added_k."),
    ("blocks.{i}.cross_attn.k.", "blocks.{i}.attn2.to_k."),
    ("blocks.{i}.cross_attn.v.", "blocks.{i}.attn2.to_v."),
    ("blocks.{i}.cross_attn.o.", "blocks.{i}.attn2.to_out.0."),
    ("blocks.{i}.cross_attn.norm_q.", "blocks.{i}.attn2.norm_q."),
    ("blocks.{i}.cross_attn.norm_k.", "blocks.{i}.attn2.norm_k."),
    ("blocks.{i}.norm3.", "blocks.{i}.norm2."),  # the affine norm before cross-attention
    ("blocks.{i}.ffn.0.", "blocks.{i}.ffn.net.0.proj."),
    ("blocks.{i}.ffn.2.", "blocks.{i}.ffn.net.2."),
]
# Whole-key renames (parameters that are not under a module prefix).
_EXACT_PAIRS: list[tuple[str, str]] = [
    ("head.modulation", "scale_shift_table"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
]


def _compile(pattern: str, exact: bool) -> re.Pattern[str]:
    body = re.escape(pattern).replace(re.escape("{i}"), r"(\d+)")
    return re.compile(body + ("$" if exact else ""))


def _rules(to_diffusers: bool) -> list[tuple[re.Pattern[str], str, bool]]:
    rules = []
    for pairs, exact in ((_EXACT_PAIRS, True), (_PREFIX_PAIRS, False)):
        for wan, diff in pairs:
            src, dst = (wan, diff) if to_diffusers else (diff, wan)
            rules.append((_compile(src, exact), dst, exact))
    return rules


_TO_DIFFUSERS = _rules(True)
_TO_WAN = _rules(False)


def _rename(key: str, rules: list[tuple[re.Pattern[str], str, bool]]) -> str:
    for pattern, target, _ in rules:
        m = pattern.match(key)
        if m:
            new_prefix = target.replace("{i}", m.group(1)) if m.groups() else target
            return new_prefix + key[m.end():]
    return key  # patch_embedding.* is named alike in both layouts


def _convert(state: Mapping[str, T], rules: list[tuple[re.Pattern[str], str, bool]]) -> dict[str, T]:
    return {_rename(k, rules): v for k, v in state.items()}


def wan_to_diffusers(state: Mapping[str, T]) -> dict[str, T]:
    return _convert(state, _TO_DIFFUSERS)


def diffusers_to_wan(state: Mapping[str, T]) -> dict[str, T]:
    return _convert(state, _TO_WAN)


def detect_layout(keys: Iterable[str]) -> str:
    """'wan' or 'diffusers', from the keys of a DiT state dict."""
    keys = list(keys)
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
        return "diffusers"
    if any(k.startswith("time_projection.") or ".self_attn." in k for k in keys):
        return "wan"
    raise ValueError("these keys are neither Wan's nor diffusers' Wan DiT layout (no time_projection/condition_embedder)")


def from_layout(state: Mapping[str, T], layout: str) -> dict[str, T]:
    """Keys in `layout` ('wan' or 'diffusers') -> Wan's own; any subset of a checkpoint's keys (a LoRA's targets)."""
    return dict(state) if layout == "wan" else diffusers_to_wan(state)


def to_wan_layout(state: Mapping[str, T]) -> dict[str, T]:
    """Any supported layout -> Wan's own."""
    return dict(state) if detect_layout(state.keys()) == "wan" else diffusers_to_wan(state)
