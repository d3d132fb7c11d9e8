"""Key layout of madebyollin/taehv's checkpoints (`taew2_1.pth`, `taew2_2.pth`, HunyuanVideo-1.5's `taehv1_5.pth`,
and their .safetensors twins), read without torch.

A checkpoint is the `state_dict()` of the whole TAEHV (`encoder.*` and `decoder.*`, no prefix). The decoder is one
`nn.Sequential`, so its names are indices (base variant; n = `channels`, (256, 128, 64, 64) as published):

    0 Clamp (tanh(x / 3) * 3)     1 Conv2d(z_dim, n0, 3)     2 ReLU
    3, 4, 5 MemBlock(n0): conv.0 Conv2d(2 n0, n0, 3), conv.2 and conv.4 Conv2d(n0, n0, 3) (ReLUs between)
    6 Upsample(x2, nearest)   7 TGrow(n0): conv Conv2d(n0, n0 * stride, 1, no bias)   8 Conv2d(n0, n1, 3, no bias)
    9..11 MemBlock(n1)  12 Upsample  13 TGrow(n1)  14 Conv2d(n1, n2, no bias)
    15..17 MemBlock(n2) 18 Upsample  19 TGrow(n2)  20 Conv2d(n2, n3, no bias)  21 ReLU
    22 Conv2d(n3, 3 * patch_size ** 2, 3), then PixelShuffle(patch_size)

Read off the shapes: z_dim (taehv's `latent_channels`, the repo's name for a VAE's latent channels, the key the
compiler compares with the DiT's out_dim: 16 for Wan2.1 and Wan2.2-A14B's VAE, 48 for Wan2.2-5B's, 32 for
HunyuanVideo-1.5's), patch_size (1, or 2 for taew2_2 and taehv1_5), the widths, and each TGrow's time stride
(rows / columns: 1, 2, 2 as published, so T latents -> 4 T frames, of which the first 3 are trimmed: 21 -> 81).
The "super" decoder variant (`*_super.pth`, ConvNeXt-style blocks, `decoder.0` a 1x1 conv) is recognised and
refused. Shapes cannot tell taew2_1 from Hunyuan's `taehv.pth` (the same 16 channels and layout): a file named in a
recipe is trusted to be the Wan one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MEMBLOCKS = ((3, 4, 5), (9, 10, 11), (15, 16, 17))  # decoder indices of the MemBlocks of each stage
TGROWS = (7, 13, 19)
STAGE_CONVS = (8, 14, 20)  # the width-changing conv after each stage's TGrow
FIRST_CONV, LAST_CONV = 1, 22
ARCH_KEYS = ("z_dim", "patch_size", "channels", "decoder_time_upscale")


def detect_layout(keys: Iterable[str]) -> str:
    keys = set(keys)
    if "decoder.0.weight" in keys and "decoder.1.conv.0.weight" in keys:
        raise ValueError("a TAEHV 'super' decoder (decoder.0 is a 1x1 conv, ConvNeXt-style blocks); only the base "
                         "decoder (taew2_1.pth, taew2_2.pth) is supported")
    if f"decoder.{FIRST_CONV}.weight" in keys and f"decoder.{TGROWS[0]}.conv.weight" in keys:
        return "taehv"
    raise ValueError("these keys are not a TAEHV checkpoint (decoder.1.weight, decoder.7.conv.weight, ...)")


def to_wan_layout(state: Mapping[str, T]) -> dict[str, T]:
    """The decoder's tensors under the model's own names (the decoder module is the model's `decoder`, so names
    are kept); the encoder's are dropped (this model decodes only)."""
    return {k: v for k, v in state.items() if k.startswith("decoder.")}


def expected_shapes(arch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every decoder tensor of a TAEHV of `arch` and its shape."""
    n, z, p = arch["channels"], arch["z_dim"], arch["patch_size"]
    strides = [2 if t else 1 for t in arch["decoder_time_upscale"]]
    shapes: dict[str, tuple[int, ...]] = {f"decoder.{FIRST_CONV}.weight": (n[0], z, 3, 3),
                                          f"decoder.{FIRST_CONV}.bias": (n[0],)}
    for stage in range(3):
        c = n[stage]
        for i in MEMBLOCKS[stage]:
            for j, cin in ((0, 2 * c), (2, c), (4, c)):
                shapes[f"decoder.{i}.conv.{j}.weight"] = (c, cin, 3, 3)
                shapes[f"decoder.{i}.conv.{j}.bias"] = (c,)
        shapes[f"decoder.{TGROWS[stage]}.conv.weight"] = (c * strides[stage], c, 1, 1)
        shapes[f"decoder.{STAGE_CONVS[stage]}.weight"] = (n[stage + 1], c, 3, 3)
    shapes[f"decoder.{LAST_CONV}.weight"] = (3 * p * p, n[3], 3, 3)
    shapes[f"decoder.{LAST_CONV}.bias"] = (3 * p * p,)
    return shapes


def describe(shapes: Mapping[str, Iterable[int]]) -> dict[str, Any]:
    """The arch dict (TAEHVConfig fields) of a TAEHV checkpoint's tensors {name: shape}; ValueError says why not."""
    own = {k: tuple(s) for k, s in shapes.items() if k.startswith("decoder.")}
    detect_layout(own)
    try:
        z = own[f"decoder.{FIRST_CONV}.weight"][1]
        channels = [own[f"decoder.{FIRST_CONV}.weight"][0]] + [own[f"decoder.{i}.weight"][0] for i in STAGE_CONVS]
        time_up = []
        for stage, i in enumerate(TGROWS):
            rows, cols = own[f"decoder.{i}.conv.weight"][:2]
            if rows not in (cols, 2 * cols):
                raise ValueError(f"decoder.{i}.conv.weight has shape {list(own[f'decoder.{i}.conv.weight'])}: a "
                                 "TGrow's rows are its width times 1 or 2")
            time_up.append(rows == 2 * cols)
        out = own[f"decoder.{LAST_CONV}.weight"][0]
    except KeyError as exc:
        raise ValueError(f"it lacks the TAEHV decoder tensor {exc.args[0]!r}: a truncated file") from None
    patch = round((out / 3) ** 0.5)
    if 3 * patch * patch != out:
        raise ValueError(f"its last conv makes {out} channels, not 3 x patch_size^2")
    arch = {"z_dim": z, "patch_size": patch, "channels": channels, "decoder_time_upscale": time_up}
    want = expected_shapes(arch)
    missing = sorted(want.keys() - own.keys())
    if missing:
        raise ValueError(f"it lacks {len(missing)} TAEHV decoder tensors ({', '.join(missing[:3])}, ...)")
    wrong = [f"{k} {list(own[k])} (expected {list(want[k])})" for k in sorted(want) if own[k] != want[k]]
    if wrong:
        raise ValueError(f"{len(wrong)} decoder tensors have unexpected shapes: {'; '.join(wrong[:2])}")
    return arch
