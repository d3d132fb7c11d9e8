"""HunyuanVideo-1.5 VAE key layouts: Tencent's own (canonical here; `AutoencoderKLConv3D`: encoder.down.N.block.M,
mid.block_1 / attn_1 / block_2, decoder.up.N.block.M, up.N.upsample) and diffusers' `AutoencoderKLHunyuanVideo15`
(down_blocks.N.resnets.M, mid_block.resnets / attentions, up_blocks.N.upsamplers.0). Renames only."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

# (Tencent regex, Tencent template, diffusers regex, diffusers template) over the part before a resnet/attention's
# own parameter names; then the inner renames below.
_BLOCKS = [
    (r"(encoder|decoder)\.down\.(\d+)\.block\.(\d+)\.", r"\1.down_blocks.\2.resnets.\3."),
    (r"(encoder|decoder)\.up\.(\d+)\.block\.(\d+)\.", r"\1.up_blocks.\2.resnets.\3."),
    (r"(encoder|decoder)\.down\.(\d+)\.downsample\.", r"\1.down_blocks.\2.downsamplers.0."),
    (r"(encoder|decoder)\.up\.(\d+)\.upsample\.", r"\1.up_blocks.\2.upsamplers.0."),
    (r"(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
]
_BACK = [
    (r"(encoder|decoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.down.\2.block.\3."),
    (r"(encoder|decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.up.\2.block.\3."),
    (r"(encoder|decoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample."),
    (r"(encoder|decoder)\.up_blocks\.(\d+)\.upsamplers\.0\.", r"\1.up.\2.upsample."),
    (r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
]
_INNER = {"nin_shortcut.": "conv_shortcut.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v."}
_INNER_BACK = {v: k for k, v in _INNER.items()}


def _convert(state: Mapping[str, T], rules: list[tuple[str, str]], inner: Mapping[str, str]) -> dict[str, T]:
    compiled = [(re.compile("^" + p), r) for p, r in rules]
    out: dict[str, T] = {}
    for key, value in state.items():
        new = key
        for pattern, repl in compiled:
            m = pattern.match(key)
            if m:
                head, rest = m.expand(repl), key[m.end():]
                for src, dst in inner.items():
                    if rest.startswith(src):
                        rest = dst + rest[len(src):]
                        break
                new = head + rest
                break
        out[new] = value
    return out


def tencent_to_diffusers(state: Mapping[str, T]) -> dict[str, T]:
    return _convert(state, _BLOCKS, _INNER)


def diffusers_to_tencent(state: Mapping[str, T]) -> dict[str, T]:
    return _convert(state, _BACK, _INNER_BACK)


def detect_layout(keys: Iterable[str]) -> str:
    """'tencent' or 'diffusers', from the keys of a HunyuanVideo-1.5 VAE state dict."""
    keys = list(keys)
    if any(k.startswith("encoder.down.") or k.startswith("decoder.up.") or ".mid.attn_1." in k for k in keys):
        return "tencent"
    if any(k.startswith("encoder.down_blocks.") or ".mid_block.attentions." in k for k in keys):
        return "diffusers"
    raise ValueError("these keys are neither Tencent's nor diffusers' HunyuanVideo-1.5 VAE layout")


def to_tencent_layout(state: Mapping[str, T]) -> dict[str, T]:
    return dict(state) if detect_layout(state.keys()) == "tencent" else diffusers_to_tencent(state)


to_wan_layout = to_tencent_layout  # the registry's contract name: to the canonical official layout
