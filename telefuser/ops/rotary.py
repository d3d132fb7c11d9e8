"""Wan's 3-D rotary position embedding over (frame, height, width).

The head dim's complex pairs are split into a frame part, then equal height
and width parts (`head_dim//2 - 2*(head_dim//6)`, `head_dim//6`, `head_dim//6`
pairs); each part rotates by its own coordinate with frequencies
theta^(-2i/d_part) as Wan's rope_params builds them.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch


def _axis_angles(positions: int, pairs: int, theta: float) -> torch.Tensor:
    d = 2 * pairs
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)  # [positions, pairs]


def wan_rope_cos_sin(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                     device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 [f*h*w, head_dim // 2], tokens in (frame, height, width) order."""
    f, h, w = grid
    half = head_dim // 2
    hw_pairs = head_dim // 6
    parts = (half - 2 * hw_pairs, hw_pairs, hw_pairs)
    angles = [_axis_angles(n, p, theta) for n, p in zip(grid, parts)]  # float64, as Wan builds its tables
    full = torch.cat([
        angles[0][:, None, None, :].expand(f, h, w, -1),
        angles[1][None, :, None, :].expand(f, h, w, -1),
        angles[2][None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, half)
    return full.cos().float().to(device), full.sin().float().to(device)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[..., 2i], x[..., 2i+1]) of x [B, S, N, D] by angle (cos, sin)[s, i]."""
    if dispatch.use_kernel("rotary", x):
        from telefuser.kernels.triton.rotary import apply_rotary_emb as kernel

        return kernel(x, cos, sin)
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((real * c - imag * s, real * s + imag * c), dim=-1).flatten(-2).to(x.dtype)
