"""Gated residual add: x + gate * y (the DiT block's output of attention and FFN)."""

from __future__ import annotations

import torch

from . import dispatch


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y in float32, returned in x's dtype; gate broadcasts (e.g. [B, 1, D] over tokens)."""
    if dispatch.use_kernel("gated_add", x):
        from telefuser.kernels.triton.residual import gated_add as kernel

        return kernel(x, y, gate)
    return (x.float() + y.float() * gate.float()).to(x.dtype)
