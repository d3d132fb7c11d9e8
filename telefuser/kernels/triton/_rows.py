"""Shared launch geometry for the row-wise kernels: rows of length D, one program per row."""

from __future__ import annotations

import torch
import triton


def row_block(dim: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole row in registers, as a power of two; more warps for longer rows."""
    block = triton.next_power_of_2(dim)
    return block, min(max(block // 256, 1), 16)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, D] without a copy; refuses a last dim that is not contiguous."""
    if x.stride(-1) != 1:
        raise ValueError(f"the last dim must be contiguous (stride 1), got strides {tuple(x.stride())}; call .contiguous()")
    rows = x.view(-1, x.shape[-1]) if x.is_contiguous() else None
    if rows is None:  # the kernels index row r at r * D: rows must be densely packed
        raise ValueError(f"a tensor of shape {tuple(x.shape)} with strides {tuple(x.stride())} is not contiguous; "
                         "call .contiguous() first")
    return rows


def token_strides(t: torch.Tensor, x: torch.Tensor) -> tuple[int, int, int]:
    """(tokens per batch, batch stride, token stride) of a [B, 1|S, D] per-sample or per-token tensor
    broadcast against x [B, S, D]; stride 0 where it broadcasts, so nothing is materialised."""
    if x.dim() != 3 or t.dim() != 3 or t.shape[-1] != x.shape[-1]:
        raise ValueError(f"expected x [B, S, D] and a [B or 1, S or 1, D] modulation, got {tuple(x.shape)} and {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError("the modulation tensor's last dim must be contiguous")
    e = t.expand(x.shape[0], x.shape[1], x.shape[2])
    return x.shape[1], e.stride(0), e.stride(1)
