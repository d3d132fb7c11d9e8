"""Wan2.2 VAE (Wan2.2 TI2V-5B): 48 latent channels, 4x time and 16x space, in Wan's own layout (`Wan2.2_VAE.pth`).

What differs from the Wan2.1 VAE (`vae.py`, whose building blocks this module imports):

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

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from telefuser.models.wan.vae import (
    CHANNELS_LAST,
    CausalCache,
    CausalConv3d,
    Resample,
    ResidualBlock,
    _blend,
    _head,
    _middle,
    _run,
    _run_head,
)

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


def _unpatchify_into(out: torch.Tensor, x: torch.Tensor, p: int) -> None:
    """Write patchify's inverse of x [B, C*p*p, F, h, w] into out [B, C, F, h*p, w*p] (any strides)."""
    c, h, w = out.shape[1], x.shape[3], x.shape[4]
    target = out.unflatten(4, (w, p)).unflatten(3, (h, p))  # b c f h dh w dw
    target.copy_(x.unflatten(1, (c, p, p)).permute(0, 1, 4, 5, 3, 6, 2))  # b c dw dh f h w -> b c f h dh w dw


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
        return _run(self.downsamples, x, cache).add_(_avg_down(x, self.out_dim, self.factor_t, self.factor_s))


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
        out = _run(self.upsamples, x, cache)
        if self.up:  # (Wan's last stage has no shortcut at all)
            first_chunk = cache.get((self, "seen")) is None
            cache[(self, "seen")] = True
            _add_dup_up(out, x, self.factor_t, 2, first_chunk)
        return out


class Encoder3d(nn.Module):
    def __init__(self, cfg: Wan22VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * cfg.patch_size**2, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownStage(dims[i], dims[i + 1], cfg.num_res_blocks, i < last and cfg.temporal_downsample[i], i < last)
            for i in range(len(cfg.dim_mult))))
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], cfg.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        return _run_head(self.head, _run(self.middle, _run(self.downsamples, x, cache), cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: Wan22VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_base_dim * m for m in [mult[-1], *mult[::-1]]]
        temporal_upsample = cfg.temporal_downsample[::-1]
        last = len(mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        self.upsamples = nn.Sequential(*(
            UpStage(dims[i], dims[i + 1], cfg.num_res_blocks + 1, i < last and temporal_upsample[i], i < last)
            for i in range(len(mult))))
        self.head = _head(dims[-1], 3 * cfg.patch_size**2)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        return _run_head(self.head, _run(self.upsamples, _run(self.middle, x, cache), cache), cache)


class Wan22VAE(nn.Module):
    def __init__(self, config: Wan22VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.network_ratio = 2 ** (len(config.dim_mult) - 1)  # 8: the encoder's own spatial compression
        self.spatial_ratio = config.patch_size * self.network_ratio  # 16: pixels per latent pixel
        self.temporal_ratio = 2 ** sum(config.temporal_downsample)  # 4
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        stats = torch.tensor([LATENT_MEAN, LATENT_STD]) if config.z_dim == len(LATENT_MEAN) else \
            torch.stack([torch.zeros(config.z_dim), torch.ones(config.z_dim)])
        self.register_buffer("latent_stats", stats.view(2, 1, config.z_dim, 1, 1, 1), persistent=False)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latent mean [B, z, 1+k, H/16, W/16]."""
        if (video.shape[2] - 1) % self.temporal_ratio:
            raise ValueError(f"the Wan2.2 VAE encodes 1+{self.temporal_ratio}k frames, got {video.shape[2]}")
        if video.shape[3] % self.spatial_ratio or video.shape[4] % self.spatial_ratio:
            raise ValueError(f"the Wan2.2 VAE encodes heights and widths that are multiples of {self.spatial_ratio}, "
                             f"got {video.shape[3]}x{video.shape[4]}")
        x = patchify(video, self.patch_size)
        cache = CausalCache()
        # (split of zero frames would give one empty chunk: a single image is the first chunk alone)
        chunks = [x[:, :, :1]] + (list(x[:, :, 1:].split(self.temporal_ratio, dim=2)) if x.shape[2] > 1 else [])
        out = torch.cat([self.encoder(c, cache) for c in chunks], dim=2)
        mean = self.conv1(out).chunk(2, dim=1)[0]
        latent_mean, latent_std = self.latent_stats.to(mean.dtype)
        return (mean - latent_mean) / latent_std

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiled: bool = False, tile_size: tuple[int, int] = (16, 16),
               tile_stride: tuple[int, int] | None = None) -> torch.Tensor:
        """Normalised latents [B, z, T, h, w] -> video [B, 3, 1+4(T-1), 16h, 16w] in [-1, 1].

        Tiled: overlapping spatial tiles of `tile_size` latent pixels (default 16: 256 video pixels) every
        `tile_stride` (default: a quarter of the tile overlaps, 16 -> 12, as diffusers' 256/192-pixel default),
        each decoded on its own; overlaps are blended linearly (each tile with its already blended upper and
        left neighbours) in the decoder's patch space (12 channels at 8x), as diffusers' tiled decode of this
        VAE does, then unpatchified into the video. Memory is bounded by the tile, not the frame.
        """
        if tile_stride is None:
            tile_stride = (tile_size[0] - tile_size[0] // 4, tile_size[1] - tile_size[1] // 4)
        if not all(0 < s <= t for s, t in zip(tile_stride, tile_size)):
            raise ValueError(f"tile_stride {tuple(tile_stride)} must be positive and at most "
                             f"tile_size {tuple(tile_size)}")
        latent_mean, latent_std = self.latent_stats.to(z.dtype)
        z = self.conv2(z * latent_std + latent_mean)
        b, _, t, h, w = z.shape
        video = z.new_empty(b, 3, 1 + self.temporal_ratio * (t - 1), h * self.spatial_ratio, w * self.spatial_ratio)
        if tiled:
            self._decode_tiled(z, video, tile_size, tile_stride)
        else:
            start = 0
            for frames in self._decode_chunks(z):
                _unpatchify_into(video[:, :, start : start + frames.shape[2]], frames, self.patch_size)
                start += frames.shape[2]
        return video.clamp_(-1.0, 1.0)

    def _decode_chunks(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """The decoder's output (patch space: 12 channels at 8x) one latent frame at a time."""
        cache = CausalCache()
        for i in range(z.shape[2]):
            yield self.decoder(z[:, :, i : i + 1], cache)

    def _decode_patches(self, z: torch.Tensor) -> torch.Tensor:
        """The whole decoder output of z [B, z, T, h, w] in patch space: [B, 12, 1+4(T-1), 8h, 8w]."""
        b, _, t, h, w = z.shape
        r = self.network_ratio
        out = z.new_empty(b, 3 * self.patch_size**2, 1 + self.temporal_ratio * (t - 1), h * r, w * r)
        start = 0
        for frames in self._decode_chunks(z):
            out[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
        return out

    def _decode_tiled(self, z: torch.Tensor, video: torch.Tensor, tile: tuple[int, int],
                      stride: tuple[int, int]) -> None:
        r, p = self.network_ratio, self.patch_size
        height, width = z.shape[3], z.shape[4]
        blend = ((tile[0] - stride[0]) * r, (tile[1] - stride[1]) * r)
        # A tile's top-left `stride` part is final once it is blended with its upper and left neighbours, so it
        # goes straight into the video; only the (patch-space) strips the next tiles blend from are kept.
        above: list[torch.Tensor] = []  # bottom strips of the previous row's tiles
        for i in range(0, height, stride[0]):
            row_bottoms: list[torch.Tensor] = []
            left: torch.Tensor | None = None  # right strip of the previous tile in this row
            for j in range(0, width, stride[1]):
                decoded = self._decode_patches(z[:, :, :, i : i + tile[0], j : j + tile[1]])
                if above:
                    _blend(above[len(row_bottoms)], decoded, blend[0], dim=3)
                if left is not None:
                    _blend(left, decoded, blend[1], dim=4)
                keep_h, keep_w = min(stride[0], height - i) * r, min(stride[1], width - j) * r
                region = video[:, :, :, i * r * p : (i * r + keep_h) * p, j * r * p : (j * r + keep_w) * p]
                _unpatchify_into(region, decoded[:, :, :, :keep_h, :keep_w], p)
                # clones: a view would keep the whole tile alive
                left = decoded[:, :, :, :, decoded.shape[4] - blend[1]:].clone()
                row_bottoms.append(decoded[:, :, :, decoded.shape[3] - blend[0]:].clone())
            above = row_bottoms
