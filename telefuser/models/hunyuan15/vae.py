"""HunyuanVideo-1.5 VAE: a causal 3-D convolutional autoencoder with 32 latent channels, 16x spatial and 4x
temporal compression, in Tencent's own parameter layout (`vae/diffusion_pytorch_model.safetensors` of
tencent/HunyuanVideo-1.5, class `AutoencoderKLConv3D`); diffusers' `AutoencoderKLHunyuanVideo15` layout is converted
by `vae_keys`.

Published config: block_out_channels (128, 256, 512, 1024, 1024), 2 residual blocks per encoder level (3 per
decoder level), latent_channels 32, ffactor_spatial 16, ffactor_temporal 4, scaling_factor 1.03682 (no shift).

- Causal 3-D convolutions pad time with two copies of the first frame and space by one pixel, both replicating
  the border ("replicate" padding), as published.
- Resampling moves pixels between space/time and channels (space-to-depth 2x2, or 2x2x2 where time is resampled;
  the first frame is resampled in space only), with a parameter-free shortcut (channel-group means going down,
  channel repeats going up) beside a causal convolution.
- The middle block's attention is one head over every pixel of every frame, causal by frame (a frame's pixels
  attend its own frame and earlier ones); here it runs frame by frame against the keys so far, never building the
  [pixels, pixels] mask.
- Everything is causal in time, so the decode runs one latent frame at a time (1 frame out for the first, 4 for
  each next), carrying each causal convolution's last two input frames and the attention's keys and values
  between frames (`StreamCache`): the same video as one pass over the clip, without its activations.
- Norms are RMS over channels: F.normalize(x, dim=1) * sqrt(C) * gamma.

Latent convention (as `WanVAE`): `encode` returns the posterior mean times `scaling_factor` (what the DiT sees)
and `decode` takes that, returning video in [-1, 1]. A video of 1 + 4k frames has 1 + k latent frames.
`tiled=True` also bounds memory by a spatial tile, as diffusers' and Tencent's spatial tiling do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from telefuser.models.wan.causal_vae import TileStitcher  # the same cross-fade and order of overlapping tiles
from telefuser.ops.attention import attention
from telefuser.schema.vae_tiles import hy15_frames_per_tile_call


@dataclass(frozen=True)
class HunyuanVideo15VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 1024])
    layers_per_block: int = 2
    spatial_ratio: int = 16  # ffactor_spatial
    temporal_ratio: int = 4  # ffactor_temporal
    scaling_factor: float = 1.03682

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if 2 ** (levels - 1) < self.spatial_ratio or self.spatial_ratio & (self.spatial_ratio - 1):
            raise ValueError(f"spatial_ratio {self.spatial_ratio} must be a power of 2 of at most 2^(levels - 1)")
        if self.temporal_ratio > self.spatial_ratio or self.temporal_ratio & (self.temporal_ratio - 1):
            raise ValueError(f"temporal_ratio {self.temporal_ratio} must be a power of 2 of at most spatial_ratio")
        if self.block_out_channels[-1] % (2 * self.latent_channels) or self.block_out_channels[-1] % self.latent_channels:
            raise ValueError(f"the last level's {self.block_out_channels[-1]} channels must be a multiple of "
                             f"2 x latent_channels ({2 * self.latent_channels})")


class RMSNorm3d(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (parameter `gamma` [C, 1, 1, 1]), statistics in float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class StreamCache(dict):
    """State a chunk-by-chunk (causal) decode carries between chunks, per module: each causal convolution's last
    kernel-1 input frames, the attention's keys and values so far, whether an upsampler has seen the first frame."""


class CausalConv3d(nn.Module):
    """Conv3d (key `conv`) after replicate padding: kernel-1 frames before, kernel//2 pixels on each side.
    With a `StreamCache`, the frames before a chunk are the previous chunk's last ones (the first chunk's first
    frame, replicated, before the first chunk): the same output as over the whole clip."""

    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__()
        self.kernel = kernel
        self.pad = (kernel // 2, kernel // 2, kernel // 2, kernel // 2, kernel - 1, 0)
        self.conv = nn.Conv3d(cin, cout, kernel)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if cache is None:
            return self.conv(F.pad(x, self.pad, mode="replicate"))
        before = cache.get(id(self))
        if before is None:
            before = x[:, :, :1].expand(-1, -1, self.kernel - 1, -1, -1)
        stream = torch.cat([before, x], dim=2)
        cache[id(self)] = stream[:, :, stream.shape[2] - (self.kernel - 1):].clone()
        return self.conv(F.pad(stream, self.pad[:4] + (0, 0), mode="replicate"))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm3d(cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = RMSNorm3d(cout)
        self.conv2 = CausalConv3d(cout, cout)
        if cin != cout:
            self.nin_shortcut = nn.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x)), cache))), cache)
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """One head over all pixels, causal by frame (keys norm, q, k, v, proj_out: 1x1x1 convolutions)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm3d(dim)
        self.q = nn.Conv3d(dim, dim, 1)
        self.k = nn.Conv3d(dim, dim, 1)
        self.v = nn.Conv3d(dim, dim, 1)
        self.proj_out = nn.Conv3d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        b, c, f, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # [B, 1, S, C]
        n, seen = h * w, 0
        if cache is not None:  # the keys and values of the frames before this chunk
            k_before, v_before = cache.get(id(self), (k[:, :, :0], v[:, :, :0]))
            seen = k_before.shape[2] // n
            k, v = torch.cat([k_before, k], dim=2), torch.cat([v_before, v], dim=2)
            cache[id(self)] = (k, v)
        out = torch.cat([attention(q[:, :, i * n:(i + 1) * n], k[:, :, :(seen + i + 1) * n],
                                   v[:, :, :(seen + i + 1) * n], input_layout="BNSD") for i in range(f)], dim=2)
        out = out[:, 0].transpose(1, 2).reshape(b, c, f, h, w)
        return x + self.proj_out(out)


def space_to_depth(x: torch.Tensor, rt: int, rs: int = 2) -> torch.Tensor:
    """[B, C, F*rt, H*rs, W*rs] -> [B, rt*rs*rs*C, F, H, W], the offsets outermost in the channels."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f // rt, rt, h // rs, rs, w // rs, rs)
    return x.permute(0, 3, 5, 7, 1, 2, 4, 6).reshape(b, rt * rs * rs * c, f // rt, h // rs, w // rs)


def depth_to_space(x: torch.Tensor, rt: int, rs: int = 2) -> torch.Tensor:
    """The inverse of `space_to_depth`."""
    b, packed, f, h, w = x.shape
    c = packed // (rt * rs * rs)
    x = x.view(b, rt, rs, rs, c, f, h, w)
    return x.permute(0, 4, 5, 1, 6, 2, 7, 3).reshape(b, c, f * rt, h * rs, w * rs)


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int, temporal: bool) -> None:
        super().__init__()
        factor = 8 if temporal else 4
        self.temporal = temporal
        self.conv = CausalConv3d(cin, cout // factor)
        self.group = factor * cin // cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if not self.temporal:
            h = space_to_depth(h, 1)
            s = space_to_depth(x, 1)
            return h + s.unflatten(1, (h.shape[1], self.group)).mean(2)
        # The first frame is resampled in space only; its channels are doubled to match the 2x2x2 frames after it.
        h_first = space_to_depth(h[:, :, :1], 1)
        h = torch.cat([torch.cat([h_first, h_first], 1), space_to_depth(h[:, :, 1:], 2)], 2)
        s_first = space_to_depth(x[:, :, :1], 1).unflatten(1, (h.shape[1], self.group // 2)).mean(2)
        s_next = space_to_depth(x[:, :, 1:], 2).unflatten(1, (h.shape[1], self.group)).mean(2)
        return h + torch.cat([s_first, s_next], 2)


class Upsample(nn.Module):
    def __init__(self, cin: int, cout: int, temporal: bool) -> None:
        super().__init__()
        factor = 8 if temporal else 4
        self.temporal = temporal
        self.conv = CausalConv3d(cin, cout * factor)
        self.repeats = factor * cout // cin

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.conv(x, cache)
        if not self.temporal:
            return depth_to_space(h, 1) + depth_to_space(x.repeat_interleave(self.repeats, dim=1), 1)
        first = 1  # the clip's first frame is upsampled in space only
        if cache is not None:
            first = 0 if cache.get(id(self)) else 1
            cache[id(self)] = True
        h_first = depth_to_space(h[:, :, :first], 1)
        h = torch.cat([h_first[:, : h_first.shape[1] // 2], depth_to_space(h[:, :, first:], 2)], 2)
        s_first = depth_to_space(x[:, :, :first], 1).repeat_interleave(self.repeats // 2, dim=1)
        s_next = depth_to_space(x[:, :, first:], 2).repeat_interleave(self.repeats, dim=1)
        return h + torch.cat([s_first, s_next], 2)


class _Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, name, resample)


class _Mid(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(dim, dim)
        self.attn_1 = AttnBlock(dim)
        self.block_2 = ResnetBlock(dim, dim)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, cache), cache), cache)


class Encoder(nn.Module):
    def __init__(self, cfg: HunyuanVideo15VAEConfig) -> None:
        super().__init__()
        ch = cfg.block_out_channels
        self.group = ch[-1] // (2 * cfg.latent_channels)
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down = nn.ModuleList()
        cin = ch[0]
        spatial_levels = int(math.log2(cfg.spatial_ratio))
        first_temporal = int(math.log2(cfg.spatial_ratio // cfg.temporal_ratio))
        for i, cout in enumerate(ch):
            blocks = []
            for _ in range(cfg.layers_per_block):
                blocks.append(ResnetBlock(cin, cout))
                cin = cout
            resample = None
            if i < spatial_levels:
                resample = Downsample(cin, ch[i + 1], temporal=i >= first_temporal)
                cin = ch[i + 1]
            self.down.append(_Level(blocks, resample, "downsample"))
        self.mid = _Mid(cin)
        self.norm_out = RMSNorm3d(cin)
        self.conv_out = CausalConv3d(cin, 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        shortcut = h.unflatten(1, (-1, self.group)).mean(2)
        return self.conv_out(F.silu(self.norm_out(h))) + shortcut


class Decoder(nn.Module):
    def __init__(self, cfg: HunyuanVideo15VAEConfig) -> None:
        super().__init__()
        ch = list(reversed(cfg.block_out_channels))
        self.repeats = ch[0] // cfg.latent_channels
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0])
        self.mid = _Mid(ch[0])
        self.up = nn.ModuleList()
        cin = ch[0]
        spatial_levels, temporal_levels = int(math.log2(cfg.spatial_ratio)), int(math.log2(cfg.temporal_ratio))
        for i, cout in enumerate(ch):
            blocks = []
            for _ in range(cfg.layers_per_block + 1):
                blocks.append(ResnetBlock(cin, cout))
                cin = cout
            resample = None
            if i < spatial_levels or i < temporal_levels:
                resample = Upsample(cin, ch[i + 1], temporal=i < temporal_levels)
                cin = ch[i + 1]
            self.up.append(_Level(blocks, resample, "upsample"))
        self.norm_out = RMSNorm3d(cin)
        self.conv_out = CausalConv3d(cin, cfg.out_channels)

    def forward(self, z: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.mid(self.conv_in(z, cache) + z.repeat_interleave(self.repeats, dim=1), cache)
        for level in self.up:
            for block in level.block:
                h = block(h, cache)
            if hasattr(level, "upsample"):
                h = level.upsample(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


class HunyuanVideo15VAE(nn.Module):
    def __init__(self, config: HunyuanVideo15VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_ratio = config.spatial_ratio
        self.temporal_ratio = config.temporal_ratio
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] (H, W multiples of 16) -> scaled latent mean [B, 32, 1+k, H/16, W/16]."""
        if (video.shape[2] - 1) % self.temporal_ratio:
            raise ValueError(f"the HunyuanVideo-1.5 VAE encodes 1+{self.temporal_ratio}k frames, got {video.shape[2]}")
        if video.shape[3] % self.spatial_ratio or video.shape[4] % self.spatial_ratio:
            raise ValueError(f"frame size {tuple(video.shape[3:])} is not a multiple of {self.spatial_ratio}")
        mean = self.encoder(video.to(self.decoder.conv_in.conv.weight.dtype)).chunk(2, dim=1)[0]
        return mean * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiled: bool = False, tile_size: tuple[int, int] = (16, 16),
               tile_stride: tuple[int, int] | None = None) -> torch.Tensor:
        """Scaled latents [B, 32, T, h, w] -> video [B, 3, 1+4(T-1), 16h, 16w] in [-1, 1].

        Tiled: overlapping spatial tiles of `tile_size` latent pixels every `tile_stride` (default: a quarter of
        the tile overlaps: 16 -> 12, diffusers' 256/192-pixel default), each decoded on its own over all frames,
        the overlaps blended linearly with the already blended upper and left neighbours.
        """
        if tile_stride is None:
            tile_stride = (tile_size[0] - tile_size[0] // 4, tile_size[1] - tile_size[1] // 4)
        if not all(0 < s <= t for s, t in zip(tile_stride, tile_size)):
            raise ValueError(f"tile_stride {tuple(tile_stride)} must be positive and at most tile_size {tuple(tile_size)}")
        z = self.unscale(z)
        video = self._decode_tiled(z, tile_size, tile_stride) if tiled else self._decode_frames(z)
        return video.clamp_(-1.0, 1.0)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> what the decoder takes (Wan's VAE: `conv2(z * std + mean)`), in the weights' dtype:
        the step before `_decode_frames` that a tile-parallel decode runs once."""
        return (z / self.config.scaling_factor).to(self.decoder.conv_in.conv.weight.dtype)

    # The tile-parallel decode's interface (telefuser.distributed.vae_parallel.parallel_decode, shared with the Wan
    # VAEs): the decoder outputs pixels (no patches), so its output space is the video's.
    patch_size = 1
    decoder_channels = 3

    @property
    def network_ratio(self) -> int:
        return self.spatial_ratio

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        return self.unscale(z)

    def video_buffer(self, z: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = z.shape
        return z.new_empty(b, 3, 1 + self.temporal_ratio * (t - 1), h * self.spatial_ratio, w * self.spatial_ratio)

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """Several latent frames per decoder call (schema.vae_tiles: one frame of a small tile underfills a GPU)."""
        return self._decode_frames(z, chunk=hy15_frames_per_tile_call(z.shape[3], z.shape[4]))

    def _decode_frames(self, z: torch.Tensor, chunk: int | None = 1) -> torch.Tensor:
        """One tile (or the whole latent), unscaled latents in: `chunk` latent frames at a time, carrying the causal
        state between chunks (the same video as decoding all frames at once, whose activations are never held
        whole); None decodes all frames in one pass."""
        if chunk is None or z.shape[2] <= chunk:
            return self.decoder(z)
        cache = StreamCache()
        return torch.cat([self.decoder(z[:, :, i: i + chunk], cache) for i in range(0, z.shape[2], chunk)], dim=2)

    def _decode_tiled(self, z: torch.Tensor, tile: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
        """Wan's tile stitcher (each tile blended with its blended upper, then left neighbour), the tiles in row-major
        order: the order VAE parallel gathers them in, so the parallel decode is this one bit for bit."""
        stitcher = TileStitcher(self.video_buffer(z), (z.shape[3], z.shape[4]), tile, tuple(stride),
                                self.network_ratio, self.patch_size)
        for i, j in stitcher.corners:
            stitcher.add(self.decode_tile(z[:, :, :, i: i + tile[0], j: j + tile[1]]))
        return stitcher.finish()
