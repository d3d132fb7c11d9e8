"""Key layout of Practical-RIFE's `flownet.pkl` (the IFNet of the 4.x series), read without torch.

The published file is the `state_dict()` of a `DistributedDataParallel`-wrapped IFNet saved with `torch.save`, so
every name starts with `module.` (Practical-RIFE's loader strips it and keeps only such names; it loads with
strict=False). Below the prefix, for 4.25/4.26 (five IFBlocks and a feature head):

    encode.cnn0 Conv2d(3, 16, 3, s2)   encode.cnn1, encode.cnn2 Conv2d(16, 16, 3)
    encode.cnn3 ConvTranspose2d(16, head_channels, 4, s2)          head_channels: 4 (v4.26), 16 (v4.26 "heavy")
    blockN.conv0.0.0 Conv2d(in_N, c_N // 2, 3, s2)   blockN.conv0.1.0 Conv2d(c_N // 2, c_N, 3, s2)
    blockN.convblock.K.conv Conv2d(c_N, c_N, 3), blockN.convblock.K.beta [1, c_N, 1, 1]   (K < num_res_convs = 8)
    blockN.lastconv.0 ConvTranspose2d(c_N, 4 * (5 + feature_channels), 4, s2)            then PixelShuffle(2)

with c = (192, 128, 96, 64, 32) in both published variants, in_0 = 7 + 2 * head_channels (both frames, both
frames' features, the timestep) and in_N = 12 + 2 * head_channels + feature_channels for N > 0 (warped frames and
features, timestep, mask, the previous block's features, its flow). Every number of the architecture is read off
these shapes; `describe` checks the whole table, so a truncated or foreign file is refused before any tensor loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MODULE_PREFIX = "module."  # DistributedDataParallel's, kept in the published flownet.pkl
NUM_BLOCKS = 5  # block0..block4 in the 4.2x series (scales 16, 8, 4, 2, 1)
HEAD_WIDTH = 16  # encode.cnn0..cnn2 width, the same in every 4.2x release
VERSION = "4.26"  # the release whose IFNet this is (LightX2V's `RIFEv4.26`); 4.25 has the same layout

# Image scale divisor of each block. Not stored in the weights: 4.25, 4.26 and their heavy variants use
# 16, 8, 4, 2, 1; 4.25-lite (recognised by its last block's width, 24) uses 32, 16, 8, 4, 1 (vs-rife's
# IFNet_HDv3_v4_25_lite). Its weights would otherwise load and run at the wrong scales.
SCALES = [16, 8, 4, 2, 1]
LITE_BLOCK_CHANNELS = [192, 128, 96, 64, 24]
LITE_SCALES = [32, 16, 8, 4, 1]

# Arch dict keys (IFNetConfig fields): the first four read off the weights, `scales` from them as above.
ARCH_KEYS = ("head_channels", "block_channels", "num_res_convs", "feature_channels", "scales")


def _own(key: str) -> str:
    return key[len(MODULE_PREFIX):] if key.startswith(MODULE_PREFIX) else key


def _is_ifnet_key(key: str) -> bool:
    return key.startswith("encode.") or re.match(r"block\d+\.", key) is not None


def detect_layout(keys: Iterable[str]) -> str:
    """"ddp" (names under `module.`, as Practical-RIFE publishes flownet.pkl) or "plain" (already stripped)."""
    keys = list(keys)
    own = [k for k in keys if _is_ifnet_key(_own(k))]
    if not own:
        raise ValueError("these keys hold no IFNet tensor (encode.*, block0.* ... under module.): not a RIFE flownet")
    return "ddp" if all(k.startswith(MODULE_PREFIX) for k in own) else "plain"


def to_wan_layout(state: Mapping[str, T]) -> dict[str, T]:
    """The model's own names: `module.` stripped, tensors the IFNet does not use (a training-time teacher block,
    if a file has one) dropped, as Practical-RIFE's loader drops them. (Named as the registry calls every keys
    module's conversion to its canonical layout.)"""
    return {_own(k): v for k, v in state.items() if _is_ifnet_key(_own(k))}


def expected_shapes(arch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an IFNet of `arch` (own names, no prefix) and its shape."""
    head, feat, n_res = arch["head_channels"], arch["feature_channels"], arch["num_res_convs"]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (cin, cout) in enumerate(((3, HEAD_WIDTH), (HEAD_WIDTH, HEAD_WIDTH), (HEAD_WIDTH, HEAD_WIDTH))):
        shapes[f"encode.cnn{i}.weight"] = (cout, cin, 3, 3)
        shapes[f"encode.cnn{i}.bias"] = (cout,)
    shapes["encode.cnn3.weight"] = (HEAD_WIDTH, head, 4, 4)  # ConvTranspose2d: [in, out, k, k]
    shapes["encode.cnn3.bias"] = (head,)
    for n, c in enumerate(arch["block_channels"]):
        cin = 7 + 2 * head if n == 0 else 12 + 2 * head + feat
        p = f"block{n}."
        shapes[p + "conv0.0.0.weight"] = (c // 2, cin, 3, 3)
        shapes[p + "conv0.0.0.bias"] = (c // 2,)
        shapes[p + "conv0.1.0.weight"] = (c, c // 2, 3, 3)
        shapes[p + "conv0.1.0.bias"] = (c,)
        for k in range(n_res):
            shapes[p + f"convblock.{k}.conv.weight"] = (c, c, 3, 3)
            shapes[p + f"convblock.{k}.conv.bias"] = (c,)
            shapes[p + f"convblock.{k}.beta"] = (1, c, 1, 1)
        shapes[p + "lastconv.0.weight"] = (c, 4 * (5 + feat), 4, 4)
        shapes[p + "lastconv.0.bias"] = (4 * (5 + feat),)
    return shapes


def describe(shapes: Mapping[str, Iterable[int]]) -> dict[str, Any]:
    """The arch dict (IFNetConfig fields) of a flownet's tensors {name: shape}; ValueError says what is wrong."""
    own = {_own(k): tuple(s) for k, s in shapes.items() if _is_ifnet_key(_own(k))}
    if not own:
        sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
        raise ValueError(f"it holds no IFNet tensor ({sample}, ...): not a RIFE 4.x flownet.pkl")
    try:
        head = own["encode.cnn3.bias"][0]
        blocks = [own[f"block{n}.conv0.1.0.bias"][0] for n in range(NUM_BLOCKS)]
        feat = own["block0.lastconv.0.bias"][0] // 4 - 5
        n_res = len({m.group(1) for k in own if (m := re.match(r"block0\.convblock\.(\d+)\.", k))})
    except KeyError as exc:
        raise ValueError(f"it lacks the IFNet tensor {exc.args[0]!r} (RIFE 4.25/4.26 has five blocks and a "
                         "feature head): an older RIFE release, another network, or a truncated file") from None
    if any(re.match(rf"block{NUM_BLOCKS}\.", k) for k in own):
        raise ValueError(f"it has more than {NUM_BLOCKS} IFBlocks: not the 4.2x IFNet")
    scales = list(LITE_SCALES if blocks == LITE_BLOCK_CHANNELS else SCALES)
    arch = {"head_channels": head, "block_channels": blocks, "num_res_convs": n_res, "feature_channels": feat,
            "scales": scales}
    want = expected_shapes(arch)
    missing = sorted(want.keys() - own.keys())
    if missing:
        raise ValueError(f"it lacks {len(missing)} IFNet tensors ({', '.join(missing[:3])}, ...): a truncated "
                         "file or another RIFE release")
    wrong = [f"{k} {list(own[k])} (expected {list(want[k])})" for k in sorted(want) if own[k] != want[k]]
    if wrong:
        raise ValueError(f"{len(wrong)} tensors have shapes no 4.2x IFNet has: {'; '.join(wrong[:2])}")
    return arch
