"""RMSNorm and LayerNorm over the last dim: one read, one write, float32 statistics."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rows import as_rows, row_block


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_row(x, cols, mask, D, eps, w_ptr, b_ptr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """LayerNorm of one float32 row held in registers (shared with the fused modulate kernel)."""
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    y = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / D + eps)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, D, eps,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = layer_norm_row(x, cols, mask, D, eps, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("telefuser::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    rows = as_rows(x)
    out = torch.empty_like(rows)
    block, warps = row_block(rows.shape[1])
    _rms_norm_kernel[(rows.shape[0],)](rows, weight if weight is not None else rows, out, rows.shape[1], eps,
                                       HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=warps)
    return out.view(x.shape)


@torch.library.custom_op("telefuser::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    rows = as_rows(x)
    out = torch.empty_like(rows)
    block, warps = row_block(rows.shape[1])
    _layer_norm_kernel[(rows.shape[0],)](rows, weight if weight is not None else rows, bias if bias is not None else rows,
                                         out, rows.shape[1], eps, HAS_WEIGHT=weight is not None,
                                         HAS_BIAS=bias is not None, BLOCK=block, num_warps=warps)
    return out.view(x.shape)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)
