"""Gated residual add x + gate * y, the gate a [B, 1|S, D] broadcast read through its strides."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import as_rows, row_block, token_strides


@triton.jit
def _gated_add_kernel(x_ptr, y_ptr, g_ptr, out_ptr, D, S, g_b, g_s, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + (row // S) * g_b + (row % S) * g_s + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (x + g * y).to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("telefuser::gated_add", mutates_args=())
def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if y.shape != x.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    rows, yrows = as_rows(x), as_rows(y)
    out = torch.empty_like(rows)
    S, g_b, g_s = token_strides(gate, x)
    block, warps = row_block(rows.shape[1])
    _gated_add_kernel[(rows.shape[0],)](rows, yrows, gate, out, rows.shape[1], S, g_b, g_s, BLOCK=block, num_warps=warps)
    return out.view(x.shape)


@gated_add.register_fake
def _(x, y, gate):
    return torch.empty_like(x)
