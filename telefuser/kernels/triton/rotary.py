"""Wan 3-D RoPE applied to q or k [B, S, N, D]: interleaved pairs rotated by the token's (cos, sin)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import as_rows


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, S, N, HALF, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (b, s, n) head vector per program
    s = (row // N) % S
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    base = row * 2 * HALF
    real = tl.load(x_ptr + base + 2 * i, mask=mask, other=0.0).to(tl.float32)
    imag = tl.load(x_ptr + base + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + s * HALF + i, mask=mask, other=0.0)
    sn = tl.load(sin_ptr + s * HALF + i, mask=mask, other=0.0)
    tl.store(out_ptr + base + 2 * i, (real * c - imag * sn).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + 2 * i + 1, (real * sn + imag * c).to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("telefuser::apply_rotary_emb", mutates_args=())
def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, N, D]; cos/sin float32 [S, D/2]."""
    if x.dim() != 4 or cos.shape != (x.shape[1], x.shape[3] // 2) or sin.shape != cos.shape:
        raise ValueError(f"expected x [B, S, N, D] and cos/sin [S, D/2], got {tuple(x.shape)}, {tuple(cos.shape)}")
    rows = as_rows(x)
    out = torch.empty_like(rows)
    half = x.shape[3] // 2
    _rope_kernel[(rows.shape[0],)](rows, cos.float().contiguous(), sin.float().contiguous(), out,
                                   x.shape[1], x.shape[2], half, BLOCK=triton.next_power_of_2(half), num_warps=1)
    return out.view(x.shape)


@apply_rotary_emb.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)
