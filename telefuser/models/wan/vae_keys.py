"""Wan VAE key layouts: Wan's own (`Wan2.1_VAE.pth`, canonical here) and diffusers' AutoencoderKLWan.

Wan numbers the decoder's up-sampling modules in one flat list
(`decoder.upsamples.N`); diffusers groups them per stage
(`decoder.up_blocks.i.resnets.j`, `...upsamplers.0`). Each stage holds
num_res_blocks + 1 residual blocks and, except the last, one resampler, so a
flat index maps to (stage, slot) given num_res_blocks, which is read off the
keys themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

# Inside a residual block: Wan's Sequential indices <-> diffusers' names.
_RESIDUAL = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
             "shortcut.": "conv_shortcut."}
_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.",
        "encoder.conv1.": "encoder.conv_in.", "decoder.conv1.": "decoder.conv_in.",
        "encoder.head.0.": "encoder.norm_out.", "encoder.head.2.": "encoder.conv_out.",
        "decoder.head.0.": "decoder.norm_out.", "decoder.head.2.": "decoder.conv_out.",
        "encoder.middle.1.": "encoder.mid_block.attentions.0.", "decoder.middle.1.": "decoder.mid_block.attentions.0."}


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith(("decoder.up_blocks.", "encoder.down_blocks.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("decoder.upsamples.", "encoder.downsamples.")) for k in keys):
        return "wan"
    raise ValueError("these keys are neither Wan's nor diffusers' Wan VAE layout")


def _rename_prefix(key: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def _rename_inner(rest: str, table: Mapping[str, str]) -> str:
    return _rename_prefix(rest, table) or rest


def _wan_res_blocks(keys: list[str]) -> int:
    # The first resampler in the decoder's flat list sits right after num_res_blocks + 1 residual blocks.
    slots = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))}
    return min(slots) - 1


def wan_to_diffusers(state: Mapping[str, T]) -> dict[str, T]:
    nrb = _wan_res_blocks(list(state))
    per_stage = nrb + 2
    out: dict[str, T] = {}
    for key, value in state.items():
        new = _rename_prefix(key, _TOP)
        if new is None:
            if m := re.match(r"(encoder|decoder)\.middle\.([02])\.(.+)", key):
                new = f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.{_rename_inner(m[3], _RESIDUAL)}"
            elif m := re.match(r"encoder\.downsamples\.(\d+)\.(.+)", key):
                new = f"encoder.down_blocks.{m[1]}.{_rename_inner(m[2], _RESIDUAL)}"
            elif m := re.match(r"decoder\.upsamples\.(\d+)\.(.+)", key):
                stage, slot = divmod(int(m[1]), per_stage)
                where = "upsamplers.0" if slot == nrb + 1 else f"resnets.{slot}"
                new = f"decoder.up_blocks.{stage}.{where}.{_rename_inner(m[2], _RESIDUAL)}"
            else:
                raise KeyError(f"unexpected Wan VAE key {key!r}")
        out[new] = value
    return out


def diffusers_to_wan(state: Mapping[str, T]) -> dict[str, T]:
    resnets = {int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    per_stage = len(resnets) + 1
    top = {v: k for k, v in _TOP.items()}
    residual = {v: k for k, v in _RESIDUAL.items()}
    out: dict[str, T] = {}
    for key, value in state.items():
        new = _rename_prefix(key, top)
        if new is None:
            if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
                new = f"{m[1]}.middle.{int(m[2]) * 2}.{_rename_inner(m[3], residual)}"
            elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
                new = f"encoder.downsamples.{m[1]}.{_rename_inner(m[2], residual)}"
            elif m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key):
                slot = int(m[3]) if m[3] is not None else per_stage - 1
                new = f"decoder.upsamples.{int(m[1]) * per_stage + slot}.{_rename_inner(m[4], residual)}"
            else:
                raise KeyError(f"unexpected diffusers Wan VAE key {key!r}")
        out[new] = value
    return out


def to_wan_layout(state: Mapping[str, T]) -> dict[str, T]:
    return dict(state) if detect_layout(state.keys()) == "wan" else diffusers_to_wan(state)
