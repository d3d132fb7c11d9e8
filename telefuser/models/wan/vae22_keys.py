"""Wan2.2 VAE key layouts: Wan's own (`Wan2.2_VAE.pth`, canonical here) and diffusers' AutoencoderKLWan.

Wan nests each stage's modules in a Sequential inside the stage (`encoder.downsamples.i.downsamples.j`,
`decoder.upsamples.i.upsamples.j`): residual blocks at j < n, the resampler at j = n, with n residual blocks
in the stage (num_res_blocks in the encoder, num_res_blocks + 1 in the decoder). diffusers names the same
modules `encoder.down_blocks.i.resnets.j` / `.downsampler` and `decoder.up_blocks.i.resnets.j` / `.upsampler`.
Inside a residual block, the middle blocks, the heads and the top-level convolutions the names are those of
the Wan2.1 VAE (`vae_keys`). The stages' shortcuts hold no parameters, so they have no keys.

The Wan2.1 layouts (flat `encoder.downsamples.N`, diffusers' `encoder.down_blocks.N.norm1`) are refused
with a message naming them: those weights belong to `WanVAE`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from telefuser.models.wan.vae_keys import _RESIDUAL, _TOP, _rename_inner, _rename_prefix

T = TypeVar("T")

_WAN_STAGE = re.compile(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(downsamples|upsamples)\.(\d+)\.(.+)")
_DIFFUSERS_STAGE = re.compile(
    r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(?:resnets\.(\d+)|(downsampler|upsampler))\.(.+)")
_MIDDLE = re.compile(r"(encoder|decoder)\.middle\.([02])\.(.+)")
_MID_BLOCK = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)")
_RESAMPLER = ("resample.", "time_conv.")
# Wan layout <-> diffusers layout, per part of the stage path.
_PARTS = {"encoder.downsamples": ("encoder.down_blocks", "downsamples", "downsampler"),
          "decoder.upsamples": ("decoder.up_blocks", "upsamples", "upsampler")}


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(re.match(r"encoder\.down_blocks\.\d+\.resnets\.", k) for k in keys):
        return "diffusers"
    if any(re.match(r"encoder\.downsamples\.\d+\.downsamples\.", k) for k in keys):
        return "wan"
    if any(re.match(r"encoder\.(downsamples\.\d+\.residual|down_blocks\.\d+\.norm1)\.", k) for k in keys):
        raise ValueError("these keys are the Wan2.1 VAE's (one flat list of encoder blocks), not the Wan2.2 VAE's; "
                         "load them as WanVAE")
    raise ValueError("these keys are neither Wan's nor diffusers' Wan2.2 VAE layout")


def wan_to_diffusers(state: Mapping[str, T]) -> dict[str, T]:
    out: dict[str, T] = {}
    for key, value in state.items():
        new = _rename_prefix(key, _TOP)
        if new is None:
            if m := _MIDDLE.match(key):
                new = f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.{_rename_inner(m[3], _RESIDUAL)}"
            elif (m := _WAN_STAGE.match(key)) and m[3] == _PARTS[m[1]][1]:
                stages, _, resampler = _PARTS[m[1]]
                if m[5].startswith(_RESAMPLER):
                    new = f"{stages}.{m[2]}.{resampler}.{m[5]}"
                else:
                    new = f"{stages}.{m[2]}.resnets.{m[4]}.{_rename_inner(m[5], _RESIDUAL)}"
            else:
                raise KeyError(f"unexpected Wan2.2 VAE key {key!r}")
        out[new] = value
    return out


def diffusers_to_wan(state: Mapping[str, T]) -> dict[str, T]:
    # The resampler's Wan index is the stage's number of residual blocks, read off the keys per stage.
    resnets: dict[tuple[str, str], set[int]] = {}
    for key in state:
        if (m := _DIFFUSERS_STAGE.match(key)) and m[3] is not None:
            resnets.setdefault((m[1], m[2]), set()).add(int(m[3]))
    wan_name = {v[0]: (k, v[1]) for k, v in _PARTS.items()}
    top = {v: k for k, v in _TOP.items()}
    residual = {v: k for k, v in _RESIDUAL.items()}
    out: dict[str, T] = {}
    for key, value in state.items():
        new = _rename_prefix(key, top)
        if new is None:
            if m := _MID_BLOCK.match(key):
                new = f"{m[1]}.middle.{int(m[2]) * 2}.{_rename_inner(m[3], residual)}"
            elif m := _DIFFUSERS_STAGE.match(key):
                stages, inner = wan_name[m[1]]
                if m[3] is not None:
                    new = f"{stages}.{m[2]}.{inner}.{m[3]}.{_rename_inner(m[5], residual)}"
                else:
                    new = f"{stages}.{m[2]}.{inner}.{len(resnets.get((m[1], m[2]), ()))}.{m[5]}"
            else:
                raise KeyError(f"unexpected diffusers Wan2.2 VAE key {key!r}")
        out[new] = value
    return out


def to_wan_layout(state: Mapping[str, T]) -> dict[str, T]:
    return dict(state) if detect_layout(state.keys()) == "wan" else diffusers_to_wan(state)
