"""FP8 (e4m3) activation quantisation in one pass, for torch._scaled_mm.

Per row: the row is read once, its absolute maximum sets the scale, and the
scaled values are written as float8 with the scale beside them. Per tensor:
the scale is given (from a prior amax), and the kernel only scales and casts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import as_rows, row_block

E4M3_MAX = 448.0


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, scale_ptr, D, ROWWISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if ROWWISE:
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr)
    q = tl.clamp(x / scale, -448.0, 448.0)
    tl.store(q_ptr + row * D + cols, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def quantize_fp8(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1] rowwise or [] per tensor); x ~= q * scale."""
    rows = as_rows(x)
    q = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device)
    if rowwise:
        scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    else:
        scale = (rows.abs().amax().float().clamp(min=1e-12) / E4M3_MAX).reshape(())
    block, warps = row_block(rows.shape[1])
    _quant_rows_kernel[(rows.shape[0],)](rows, q, scale, rows.shape[1], ROWWISE=rowwise, BLOCK=block, num_warps=warps)
    return q, scale
