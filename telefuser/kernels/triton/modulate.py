"""Scale-shift modulation, alone and fused with LayerNorm: the DiT block's `modulate(norm(x), shift, scale)`.

shift/scale are [B, 1, D] per-sample vectors (Wan2.1) or [B, S, D] per-token
(Wan2.2 TI2V), read through their strides so a broadcast is never
materialised. The fused kernel reads x once and writes once, where norm then
modulate would read and write twice.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._rows import as_rows, row_block, token_strides
from .norms import layer_norm_row


@triton.jit
def _modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, R, D, S, sh_b, sh_s, sc_b, sc_s,
                     NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     w_ptr, b_ptr, eps, BLOCK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    # Several rows per program: a per-sample shift/scale row is then re-read from L1, not L2.
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    for i in tl.static_range(ROWS_PER_PROGRAM):
        row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + i
        if row < R:
            b = row // S
            s = row % S
            x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            if NORM:
                x = layer_norm_row(x, cols, mask, D, eps, w_ptr, b_ptr, HAS_WEIGHT, HAS_BIAS)
            shift = tl.load(shift_ptr + b * sh_b + s * sh_s + cols, mask=mask, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + b * sc_b + s * sc_s + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * D + cols, (x * (1.0 + scale) + shift).to(out_ptr.dtype.element_ty), mask=mask)


def rows_per_program(dim: int) -> int:
    # Measured on an H100 (docs/benchmarks.md): 4 rows per program helped at dim 1536 (85 -> 74 us)
    # and hurt at dim 5120 (246 -> 280 us), where one row already fills the program.
    return 4 if dim <= 2048 else 1


def _launch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, norm: bool, eps: float,
            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    rows = as_rows(x)
    out = torch.empty_like(rows)
    S, sh_b, sh_s = token_strides(shift, x)
    _, sc_b, sc_s = token_strides(scale, x)
    block, warps = row_block(rows.shape[1])
    per_program = rows_per_program(rows.shape[1])
    _modulate_kernel[(triton.cdiv(rows.shape[0], per_program),)](
        rows, shift, scale, out, rows.shape[0], rows.shape[1], S, sh_b, sh_s, sc_b, sc_s,
        NORM=norm, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        w_ptr=weight if weight is not None else rows, b_ptr=bias if bias is not None else rows, eps=eps,
        BLOCK=block, ROWS_PER_PROGRAM=per_program, num_warps=warps)
    return out.view(x.shape)


@torch.library.custom_op("telefuser::modulate", mutates_args=())
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift for x [B, S, D]."""
    return _launch(x, shift, scale, False, 0.0, None, None)


@torch.library.custom_op("telefuser::norm_modulate", mutates_args=())
def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """layer_norm(x) * (1 + scale) + shift in one pass, for x [B, S, D]."""
    return _launch(x, shift, scale, True, eps, weight, bias)


@modulate.register_fake
def _(x, shift, scale):
    return torch.empty_like(x)


@norm_modulate.register_fake
def _(x, shift, scale, eps, weight, bias):
    return torch.empty_like(x)
