"""Wan2.2 VAE (Wan2.2 TI2V-5B): 48 latent channels, 4x time and 16x space, in Wan's own layout (`Wan2.2_VAE.pth`).

What differs from the Wan2.1 VAE (`vae.py`; the blocks, the assembly, the chunked encode, the tiled decode and the
latent statistics are shared: `vae_blocks.py`, `causal_vae.py`):

- Patchify: the video's 2x2 pixel blocks become channels first (3 -> 12 channels at half the resolution) and
  the decoder's 12 output channels are put back at the end, so the network proper compresses space 8x and
  the VAE 16x. Channel order: c * 4 + dw * 2 + dh (dh, dw: the pixel's row and column in its block).
- Residual stages: each encoder stage (`encoder.downsamples.i`) runs its residual blocks and resampler
  (`.downsamples.j`) and adds a parameter-free shortcut of its input, space-to-channel folded and
  channel-group averaged to the output's shape (`_avg_down`); each decoder stage (`decoder.upsamples.i`,
  blocks at `.upsamples.j`) adds the mirror image, its input's channels repeated and unfolded to space and
  time (`_add_dup_up`). The decoder's up-sampling convolutions keep their channels (Wan2.1's halve them).
- Widths: encoder base 160, decoder base 256 (Wan2.2's `dim`/`dec_dim`; diffusers' `base_dim`/
  `decoder_base_dim`), dim_mult [1, 2, 4, 4], 2 residual blocks per stage (3 in the decoder), time halved
  by stages 1 and 2 of the encoder ([False, True, True]).

Time is causal and chunked as in Wan2.1: a video of 1 + 4k frames is encoded as its first frame, then chunks
of 4; decoding runs one latent frame at a time (1 frame out for the first, 4 for each next). The shortcuts
work inside a chunk and need no cache: on the first chunk the time fold sees a zero frame before the video's
first (encoder), and the time unfold keeps only the last of its 2 frames (decoder), as Wan's code does.

Latent convention as `vae.py`: `encode` returns and `decode` takes *normalised* latents, (z - mean) / std per
channel with Wan2.2's published 48-channel statistics (`LATENT_MEAN`, `LATENT_STD`: Wan2.2's
`wan/modules/vae2_2.py`, class `Wan2_2_VAE`, and diffusers' Wan2.2 VAE config `latents_mean`/`latents_std`
in `scripts/convert_wan_to_diffusers.py`, the same numbers). A config with z_dim other than 48 (tests, tiny
models) has no published statistics and uses mean 0, std 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .causal_vae import CausalDecoder, CausalEncoder, CausalVideoVAE
from .vae_blocks import CausalCache, Resample, ResidualBlock, run_blocks

LATENT_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
               -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
               -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
               -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
               -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
               0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
LATENT_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
              0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
              0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
              0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
              0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
              0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclass(frozen=True)
class Wan22VAEConfig:
    z_dim: int = 48
    base_dim: int = 160  # the encoder's
    decoder_base_dim: int = 256
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    patch_size: int = 2  # pixels per side folded into channels before the encoder


def patchify(video: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, C*p*p, F, H/p, W/p], channel c*p*p + dw*p + dh; channels-last."""
    b, c, f, h, w = video.shape
    x = video.view(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 6, 4)  # b f h' w' c dw dh
    return x.reshape(b, f, h // p, w // p, c * p * p).permute(0, 4, 1, 2, 3)


def _avg_down(x: torch.Tensor, out_dim: int, ft: int, fs: int) -> torch.Tensor:
    """The encoder stage's shortcut: [B, C, T, H, W] -> [B, out_dim, ceil(T/ft), H/fs, W/fs], channels-last.

    Each (ft, fs, fs) cell of each channel becomes ft*fs*fs channels (channel-major: c, then the time,
    row and column offsets); consecutive groups of C*ft*fs*fs/out_dim of these are averaged. Time is padded
    at the front with zero frames to a multiple of ft (Wan's rule: a chunk of 1 frame is averaged with zeros).
    """
    if (-x.shape[2]) % ft:
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
    b, c, t, h, w = x.shape
    group = c * ft * fs * fs // out_dim
    if group == 1 and ft * fs == 1:
        return x
    cells = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return cells.reshape(b, t // ft, h // fs, w // fs, out_dim, group).mean(-1).permute(0, 4, 1, 2, 3)


def _add_dup_up(out: torch.Tensor, x: torch.Tensor, ft: int, fs: int, first_chunk: bool) -> None:
    """Add the decoder stage's shortcut of its input x [B, C, T, H, W] to its output out, in place.

    The shortcut repeats each input channel r = out_dim*ft*fs*fs/C times (consecutively) and reads the result
    as out_dim channels of (ft, fs, fs) cells: output frame t*ft + dt, pixel (h*fs + dh, w*fs + dw) of channel
    o is input channel (o*ft*fs*fs + (dt*fs + dh)*fs + dw) // r of frame t, pixel (h, w). On the video's first
    chunk the first ft - 1 output frames are dropped. Built and added one output frame at a time: no
    output-sized shortcut tensor exists.
    """
    out_dim, frames = out.shape[1], out.shape[2]
    c, h, w = x.shape[1], x.shape[3], x.shape[4]
    cell = ft * fs * fs
    r = out_dim * cell // c
    skip = ft - 1 if first_chunk else 0
    pixels = x.permute(0, 2, 3, 4, 1)  # b t h w c
    for j in range(frames):
        t, dt = divmod(j + skip, ft)
        src = (torch.arange(out_dim, device=x.device).view(-1, 1, 1) * cell + dt * fs * fs
               + torch.arange(fs * fs, device=x.device).view(1, fs, fs)) // r
        dup = pixels[:, t].index_select(-1, src.flatten()).view(x.shape[0], h, w, out_dim, fs, fs)
        target = out[:, :, j].permute(0, 2, 3, 1).unflatten(2, (w, fs)).unflatten(1, (h, fs))  # b h dh w dw o
        target.add_(dup.permute(0, 1, 4, 2, 5, 3))


class _Resample(Resample):
    """Wan2.1's resampler, except that up-sampling keeps the channels (Wan2.2's `Resample`)."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__(dim, mode)
        if mode.startswith("up"):
            self.resample[1] = nn.Conv2d(dim, dim, 3, padding=1)


class DownStage(nn.Module):
    """One encoder stage (Wan's `Down_ResidualBlock`): residual blocks, a resampler, the `_avg_down` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            blocks.append(_Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.out_dim, self.factor_t, self.factor_s = out_dim, 2 if temporal else 1, 2 if down else 1

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # Every block's output is a new tensor (never x, never cached), so the sum can go into it.
        return run_blocks(self.downsamples, x, cache).add_(_avg_down(x, self.out_dim, self.factor_t, self.factor_s))


class UpStage(nn.Module):
    """One decoder stage (Wan's `Up_ResidualBlock`): residual blocks, a resampler, the `_add_dup_up` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(num_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            blocks.append(_Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.up, self.factor_t = up, 2 if temporal else 1

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        out = run_blocks(self.upsamples, x, cache)
        if self.up:  # (Wan's last stage has no shortcut at all)
            first_chunk = cache.get((self, "seen")) is None
            cache[(self, "seen")] = True
            _add_dup_up(out, x, self.factor_t, 2, first_chunk)
        return out


def _encoder(cfg: Wan22VAEConfig) -> CausalEncoder:
    dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
    last = len(cfg.dim_mult) - 1
    stages = [DownStage(dims[i], dims[i + 1], cfg.num_res_blocks, i < last and cfg.temporal_downsample[i], i < last)
              for i in range(len(cfg.dim_mult))]
    return CausalEncoder(3 * cfg.patch_size**2, dims, stages, cfg.z_dim)


def _decoder(cfg: Wan22VAEConfig) -> CausalDecoder:
    mult = cfg.dim_mult
    dims = [cfg.decoder_base_dim * m for m in [mult[-1], *mult[::-1]]]
    temporal_upsample = cfg.temporal_downsample[::-1]
    last = len(mult) - 1
    stages = [UpStage(dims[i], dims[i + 1], cfg.num_res_blocks + 1, i < last and temporal_upsample[i], i < last)
              for i in range(len(mult))]
    return CausalDecoder(cfg.z_dim, dims, stages, 3 * cfg.patch_size**2)


class Wan22VAE(CausalVideoVAE):
    """Tiled decode (default tile 16 latent pixels: 256 video pixels, stride 12) blended in the decoder's patch space
    (12 channels at 8x), as diffusers' tiled decode of this VAE does, then unpatchified into the video."""

    name = "Wan2.2 VAE"
    default_tile_size = (16, 16)

    def __init__(self, config: Wan22VAEConfig) -> None:
        super().__init__(config, _encoder(config), _decoder(config), config.patch_size, LATENT_MEAN, LATENT_STD)

    def network_input(self, video: torch.Tensor) -> torch.Tensor:
        if video.shape[3] % self.spatial_ratio or video.shape[4] % self.spatial_ratio:
            raise ValueError(f"the Wan2.2 VAE encodes heights and widths that are multiples of {self.spatial_ratio}, "
                             f"got {video.shape[3]}x{video.shape[4]}")
        return patchify(video, self.patch_size)

