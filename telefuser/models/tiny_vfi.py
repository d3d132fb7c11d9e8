"""Tiny RIFE and TAEHV weights in the published key layouts, for CPU tests and the tiny VFI recipe.

`python -m telefuser.models.tiny_vfi recipes/tiny_vfi` writes, without any network:

- flownet.pkl   an IFNet of Practical-RIFE 4.26's layout as `torch.save` of a DDP state dict (every name under
                `module.`), like train_log/flownet.pkl; narrow (block widths 8, 8, 4, 4, 4; 2 ResConvs per
                block; 2 feature channels), so its arch is read off the shapes as the published file's is
- taew2_1.pth   a TAEHV in taew2_1.pth's layout (`encoder.*` and `decoder.*`, 16 latent channels, patch 1,
                time strides 1, 2, 2), widths 8 instead of 64..256
- taew2_2.pth   the same in taew2_2.pth's layout (48 latent channels, patch 2)
- taehv1_5.pth  the same in taehv1_5.pth's layout (HunyuanVideo-1.5's: patch 2), with the tiny HunyuanVideo-1.5
                VAE's 4 latent channels (telefuser.models.hunyuan15.tiny) where the published file has 32

Values come from a generator seeded by each tensor's name (as telefuser.models.tiny does), so the files are
the same on every run and machine. The weights are random: the frames they make are structured noise.
"""

from __future__ import annotations

import argparse
import math
import zlib
from pathlib import Path
from typing import Any

import torch

from telefuser.models.rife.keys import MODULE_PREFIX
from telefuser.models.rife.keys import expected_shapes as rife_shapes
from telefuser.models.taehv.keys import expected_shapes as taehv_decoder_shapes

SEED = 20250619
TINY_RIFE: dict[str, Any] = {"head_channels": 4, "block_channels": [8, 8, 4, 4, 4], "num_res_convs": 2,
                             "feature_channels": 2, "scales": [16, 8, 4, 2, 1]}
TINY_TAEW2_1: dict[str, Any] = {"z_dim": 16, "patch_size": 1, "channels": [8, 8, 8, 8],
                                "decoder_time_upscale": [False, True, True]}
TINY_TAEW2_2: dict[str, Any] = {**TINY_TAEW2_1, "z_dim": 48, "patch_size": 2}
TINY_TAEHV1_5: dict[str, Any] = {**TINY_TAEW2_1, "z_dim": 4, "patch_size": 2}  # pairs with tiny_hy15's VAE
TINY_ENCODER_WIDTH = 8  # the published encoders are 64 wide
FILES = {"rife": "flownet.pkl", "taew2_1": "taew2_1.pth", "taew2_2": "taew2_2.pth", "taehv1_5": "taehv1_5.pth"}


def _value(name: str, shape: tuple[int, ...], salt: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED ^ zlib.crc32((salt + name).encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith(".beta"):  # ResConv's per-channel residual scale, 1 at initialisation
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.05 * noise
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return noise / math.sqrt(fan_in)


def tiny_flownet_state(arch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The state dict as flownet.pkl holds it: `module.`-prefixed IFNet names."""
    shapes = rife_shapes(arch or TINY_RIFE)
    return {MODULE_PREFIX + k: _value(k, s, "rife:") for k, s in shapes.items()}


def _taehv_encoder_shapes(arch: dict[str, Any], width: int = TINY_ENCODER_WIDTH) -> dict[str, tuple[int, ...]]:
    """taehv's encoder (kept in every published checkpoint, unused by the decoder): conv, then 3 x (TPool,
    stride-2 conv, 3 MemBlocks), then a conv to the latent; time strides 2, 2, 1."""
    p, z = arch["patch_size"], arch["z_dim"]
    shapes: dict[str, tuple[int, ...]] = {"encoder.0.weight": (width, 3 * p * p, 3, 3), "encoder.0.bias": (width,)}
    for stage, stride in enumerate((2, 2, 1)):
        base = 2 + 5 * stage
        shapes[f"encoder.{base}.conv.weight"] = (width, width * stride, 1, 1)
        shapes[f"encoder.{base + 1}.weight"] = (width, width, 3, 3)
        for i in range(base + 2, base + 5):
            for j, cin in ((0, 2 * width), (2, width), (4, width)):
                shapes[f"encoder.{i}.conv.{j}.weight"] = (width, cin, 3, 3)
                shapes[f"encoder.{i}.conv.{j}.bias"] = (width,)
    shapes["encoder.17.weight"] = (z, width, 3, 3)
    shapes["encoder.17.bias"] = (z,)
    return shapes


def tiny_taehv_state(arch: dict[str, Any] | None = None, salt: str = "taew2_1:") -> dict[str, torch.Tensor]:
    """The state dict as a taew2_*.pth holds it: encoder and decoder, taehv's own names. The RGB conv
    (decoder.22) is scaled by 1/4 and its bias raised by 1/2, so the frames sit around mid-grey inside [0, 1]
    rather than half clamped: the preview is a picture, and a comparison with a reference sees every pixel."""
    arch = arch or TINY_TAEW2_1
    shapes = {**_taehv_encoder_shapes(arch), **taehv_decoder_shapes(arch)}
    state = {k: _value(k, s, salt) for k, s in shapes.items()}
    state["decoder.22.weight"] = state["decoder.22.weight"] / 4
    state["decoder.22.bias"] = state["decoder.22.bias"] + 0.5
    return state


def generate(folder: str | Path) -> dict[str, Path]:
    """Write the tiny RIFE and TAEHV files into `folder`; returns name -> file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    states = {"rife": tiny_flownet_state(), "taew2_1": tiny_taehv_state(TINY_TAEW2_1, "taew2_1:"),
              "taew2_2": tiny_taehv_state(TINY_TAEW2_2, "taew2_2:"),
              "taehv1_5": tiny_taehv_state(TINY_TAEHV1_5, "taehv1_5:")}
    written = {}
    for name, filename in FILES.items():
        path = folder / filename
        tmp = path.with_name(path.name + ".tmp")
        torch.save(states[name], tmp)
        tmp.replace(path)
        written[name] = path
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m telefuser.models.tiny_vfi", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the files (e.g. recipes/tiny_vfi)")
    for name, path in generate(parser.parse_args(argv).folder).items():
        print(f"{name:8s} {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
