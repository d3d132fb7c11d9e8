"""Wan2.1 VAE: causal 3-D convolutional autoencoder, in Wan's own parameter layout (`Wan2.1_VAE.pth`).

Time is causal: a video of 1 + 4k frames is encoded as its first frame, then
chunks of 4; decoding runs one latent frame at a time (1 frame out for the
first, 4 for each next), as Wan's own code does. Between chunks each causal
convolution keeps the last two frames of its input (`CausalCache`), so the
whole video's activations are never held at once. 16 latent channels, 4x
time, 8x space.

Latent convention: `encode` returns and `decode` takes *normalised* latents,
(z - mean) / std per channel with Wan2.1's published statistics, which is what
the DiT sees. A config with z_dim other than 16 (tests, tiny models) has no
published statistics and uses mean 0, std 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from telefuser.ops.attention import attention

LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Activations live channels-last: cuDNN's implicit-GEMM convolutions work in that layout, and NCDHW maps
# cost a layout conversion before and after every convolution (13% of a decode's time on an H100).
CHANNELS_LAST = torch.channels_last_3d


@dataclass(frozen=True)
class WanVAEConfig:
    z_dim: int = 16
    base_dim: int = 96
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])


class CausalCache(dict):
    """Per-module state carried from one time chunk to the next (module -> tensor or marker)."""


class ChannelRMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a per-channel gain (`gamma`)."""

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # F.normalize's arithmetic, written into `out` when given (a slice of a conv's padded input).
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
        # sqrt(C) folded into the gain: one pass over the map instead of two (a rounding of the gain apart,
        # the same numbers as `normalize * scale * gamma`).
        return torch.div(x, norm, out=out).mul_(self.gamma * self.scale)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the past side in time; with a cache, the past is the previous chunk."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self._time_pad = 2 * pt
        # Space is zero-padded by the convolution itself, which costs no padded copy of the input.
        self.padding = (0, ph, pw)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.convolve(self.causal_input(x, cache)) if self._time_pad else self.convolve(x)

    def convolve(self, padded: torch.Tensor) -> torch.Tensor:
        """The convolution proper, on an input already padded by `causal_input`."""
        return super().forward(padded)

    def causal_input(self, x: torch.Tensor, cache: CausalCache | None,
                     norm: ChannelRMSNorm | None = None) -> torch.Tensor:
        """x (or silu(norm(x))) behind the past frames: the cached ones, or zeros at the video's start.

        One buffer holds past and present; the activation is computed straight into it, so no separate
        full-size activation exists. The buffer's last frames are the next chunk's past.
        """
        b, c, t, h, w = x.shape
        pad = self._time_pad
        past = cache.get(self) if cache is not None else None
        buf = torch.empty(b, c, pad + t, h, w, dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST)
        if past is None:
            buf[:, :, :pad].zero_()
        else:
            buf[:, :, :pad].copy_(past)
        present = buf[:, :, pad:]
        if norm is None:
            present.copy_(x)
        else:
            F.silu(norm(x, out=present), inplace=True)
        if cache is not None:
            # clone: a view would keep the whole buffer alive in the cache
            cache[self] = buf[:, :, -pad:].clone()
        return buf


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices match the checkpoint: residual.{0,2,3,6}; 1/4 are SiLU, 5 was dropout.
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_dim, 3), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelRMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = self.shortcut(x)
        # One step per statement, so conv1's output is freed as soon as conv2's input is built from it.
        x = conv1.convolve(conv1.causal_input(x, cache, norm1))
        x = conv2.causal_input(x, cache, norm2)
        x = conv2.convolve(x)
        return x.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3 * c, h * w).transpose(1, 2)
        q, k, v = (part.unsqueeze(1) for part in qkv.chunk(3, dim=-1))  # [BT, 1, HW, C]
        out = attention(q, k, v, input_layout="BNSD").squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        out = self.proj(out).reshape(b, t, c, h, w).transpose(1, 2)
        return x + out


class Resample(nn.Module):
    """2x spatial up/down sampling, optionally with 2x causal temporal up/down sampling (`time_conv`)."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            x = self._double_frames(x, cache)
        x = self._resample_frames(x)
        if self.mode == "downsample3d" and cache is not None:
            x = self._halve_frames(x, cache)
        return x

    def _resample_frames(self, x: torch.Tensor) -> torch.Tensor:
        # Frame by frame into one output: at most one frame's 4x upsampled map exists at a time.
        first = self.resample(x[:, :, 0])
        out = torch.empty(first.shape[0], first.shape[1], x.shape[2], *first.shape[2:], dtype=first.dtype,
                          device=first.device, memory_format=CHANNELS_LAST)
        out[:, :, 0] = first
        for i in range(1, x.shape[2]):
            out[:, :, i] = self.resample(x[:, :, i])
        return out

    def _double_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # The first chunk (the video's first frame) is not doubled: 1 + 4k frames come out of 1 + k.
        if cache.get((self, "seen")) is None:
            cache[(self, "seen")] = True
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)
        return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c, 2 * t, h, w)

    def _halve_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        past = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if past is None:  # the first frame passes through alone
            return x
        return self.time_conv(torch.cat([past[:, :, -1:], x], dim=2))


def _run(blocks: nn.Sequential, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
    for block in blocks:  # residual, attention and resample blocks, all called as (x, cache)
        x = block(x, cache)
    return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    # A Sequential for the checkpoint's names (head.0 norm, head.2 conv); run by `_run_head`.
    return nn.Sequential(ChannelRMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    norm, _, conv = head
    return conv.convolve(conv.causal_input(x, cache, norm))


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], cfg.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        return _run_head(self.head, _run(self.middle, _run(self.downsamples, x, cache), cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in [mult[-1], *mult[::-1]]]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous Resample's conv halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        return _run_head(self.head, _run(self.upsamples, _run(self.middle, x, cache), cache), cache)


class WanVAE(nn.Module):
    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_ratio = 2 ** (len(config.dim_mult) - 1)  # 8 for Wan2.1
        self.temporal_ratio = 2 ** sum(config.temporal_downsample)  # 4 for Wan2.1
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        # Not in checkpoints, derived from constants: real values even when the model is built on the meta
        # device (the loader does so, then assigns the checkpoint's tensors and moves the model).
        on = "cpu" if torch.get_default_device().type == "meta" else None
        stats = torch.tensor([LATENT_MEAN, LATENT_STD], device=on) if config.z_dim == len(LATENT_MEAN) else \
            torch.stack([torch.zeros(config.z_dim, device=on), torch.ones(config.z_dim, device=on)])
        self.register_buffer("latent_stats", stats.view(2, 1, config.z_dim, 1, 1, 1), persistent=False)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latent mean [B, z, 1+k, H/8, W/8]."""
        if (video.shape[2] - 1) % self.temporal_ratio:
            raise ValueError(f"the Wan VAE encodes 1+4k frames, got {video.shape[2]}")
        cache = CausalCache()
        # The first frame alone, then chunks of 4 (none for a single image: split() of zero frames gives one
        # empty chunk, which the causal convolution cannot take).
        rest = video[:, :, 1:]
        chunks = [video[:, :, :1]] + (list(rest.split(self.temporal_ratio, dim=2)) if rest.shape[2] else [])
        out = torch.cat([self.encoder(c, cache) for c in chunks], dim=2)
        mean = self.conv1(out).chunk(2, dim=1)[0]
        latent_mean, latent_std = self.latent_stats.to(mean.dtype)
        return (mean - latent_mean) / latent_std

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiled: bool = False, tile_size: tuple[int, int] = (32, 32),
               tile_stride: tuple[int, int] | None = None) -> torch.Tensor:
        """Normalised latents [B, z, T, h, w] -> video [B, 3, 1+4(T-1), 8h, 8w] in [-1, 1].

        Tiled: overlapping spatial tiles of `tile_size` latent pixels every `tile_stride` (default: a
        quarter of the tile overlaps, 32 -> 24 as diffusers' 256/192-pixel default), each decoded on
        its own; overlaps are blended linearly (each tile with its already blended upper and left
        neighbours), which bounds memory by the tile, not the frame.
        """
        if tile_stride is None:
            tile_stride = (tile_size[0] - tile_size[0] // 4, tile_size[1] - tile_size[1] // 4)
        if not all(0 < s <= t for s, t in zip(tile_stride, tile_size)):
            raise ValueError(f"tile_stride {tuple(tile_stride)} must be positive and at most tile_size {tuple(tile_size)}")
        latent_mean, latent_std = self.latent_stats.to(z.dtype)
        z = self.conv2(z * latent_std + latent_mean)
        video = self._decode_tiled(z, tile_size, tile_stride) if tiled else self._decode_frames(z)
        return video.clamp_(-1.0, 1.0)

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = z.shape
        r = self.spatial_ratio
        # Written chunk by chunk into the (contiguous) video: no list of chunks concatenated at the end.
        video = z.new_empty(b, 3, 1 + self.temporal_ratio * (t - 1), h * r, w * r)
        cache = CausalCache()
        start = 0
        for i in range(t):
            frames = self.decoder(z[:, :, i : i + 1], cache)
            video[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
        return video

    def _decode_tiled(self, z: torch.Tensor, tile: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
        r = self.spatial_ratio
        b, _, t, height, width = z.shape
        blend = ((tile[0] - stride[0]) * r, (tile[1] - stride[1]) * r)
        video = z.new_empty(b, 3, 1 + self.temporal_ratio * (t - 1), height * r, width * r)
        # A tile's top-left `stride` part is final once it is blended with its upper and left neighbours,
        # so it goes straight into the video; only the strips the next tiles blend from are kept.
        above: list[torch.Tensor] = []  # bottom strips of the previous row's tiles
        for i in range(0, height, stride[0]):
            row_bottoms: list[torch.Tensor] = []
            left: torch.Tensor | None = None  # right strip of the previous tile in this row
            for j in range(0, width, stride[1]):
                decoded = self._decode_frames(z[:, :, :, i : i + tile[0], j : j + tile[1]])
                if above:
                    _blend(above[len(row_bottoms)], decoded, blend[0], dim=3)
                if left is not None:
                    _blend(left, decoded, blend[1], dim=4)
                keep_h, keep_w = min(stride[0], height - i) * r, min(stride[1], width - j) * r
                video[:, :, :, i * r : i * r + keep_h, j * r : j * r + keep_w] = decoded[:, :, :, :keep_h, :keep_w]
                # clones: a view would keep the whole tile alive
                left = decoded[:, :, :, :, decoded.shape[4] - blend[1]:].clone()
                row_bottoms.append(decoded[:, :, :, decoded.shape[3] - blend[0]:].clone())
            above = row_bottoms
        return video


def _blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first `extent` rows/columns of `cur` (in place) from the end of `prev`."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    if extent == 0:
        return
    shape = [1] * cur.ndim
    shape[dim] = extent
    w = (torch.arange(extent, dtype=cur.dtype, device=cur.device) / extent).view(shape)
    head = cur.narrow(dim, 0, extent)
    head.copy_(prev.narrow(dim, prev.shape[dim] - extent, extent) * (1 - w) + head * w)
