"""Wan2.1 VAE: causal 3-D convolutional autoencoder, in Wan's own parameter layout (`Wan2.1_VAE.pth`).

16 latent channels, 4x time, 8x space; chunked encode, decode one latent frame at a time and the tiled decode as
`causal_vae.py` (shared with the Wan2.2 VAE) describes.

Latent convention: `encode` returns and `decode` takes *normalised* latents, (z - mean) / std per channel with
Wan2.1's published statistics, which is what the DiT sees. A config with z_dim other than 16 (tests, tiny
models) has no published statistics and uses mean 0, std 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .causal_vae import CausalDecoder, CausalEncoder, CausalVideoVAE
from .vae_blocks import Resample, ResidualBlock

LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class WanVAEConfig:
    z_dim: int = 16
    base_dim: int = 96
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])


def _encoder(cfg: WanVAEConfig) -> CausalEncoder:
    dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
    blocks: list[nn.Module] = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if i != len(cfg.dim_mult) - 1:
            blocks.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
    return CausalEncoder(3, dims, blocks, cfg.z_dim)


def _decoder(cfg: WanVAEConfig) -> CausalDecoder:
    mult = cfg.dim_mult
    dims = [cfg.base_dim * m for m in [mult[-1], *mult[::-1]]]
    temporal_upsample = cfg.temporal_downsample[::-1]
    blocks: list[nn.Module] = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            in_dim //= 2  # the previous Resample's conv halved the channels
        for _ in range(cfg.num_res_blocks + 1):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if i != len(mult) - 1:
            blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
    return CausalDecoder(cfg.z_dim, dims, blocks, 3)


class WanVAE(CausalVideoVAE):
    name = "Wan VAE"
    default_tile_size = (32, 32)

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__(config, _encoder(config), _decoder(config), 1, LATENT_MEAN, LATENT_STD)
