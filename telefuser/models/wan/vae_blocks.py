"""The causal 3-D convolution blocks both Wan VAEs are made of (Wan2.1's `vae.py` and Wan2.2's `vae22.py`), in
Wan's own parameter names: the causal convolution and its chunk-to-chunk cache, the channel RMS norm, the residual
and attention blocks, the resampler, and the middle and head sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from telefuser.ops.attention import attention

# Activations live channels-last: cuDNN's implicit-GEMM convolutions work in that layout, and NCDHW maps
# cost a layout conversion before and after every convolution (13% of a decode's time on an H100).
CHANNELS_LAST = torch.channels_last_3d


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


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
    for block in blocks:  # residual, attention and resample blocks, all called as (x, cache)
        x = block(x, cache)
    return x


def middle_blocks(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def head_blocks(dim: int, out_dim: int) -> nn.Sequential:
    # A Sequential for the checkpoint's names (head.0 norm, head.2 conv); run by `run_head`.
    return nn.Sequential(ChannelRMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def run_head(head: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    norm, _, conv = head
    return conv.convolve(conv.causal_input(x, cache, norm))
