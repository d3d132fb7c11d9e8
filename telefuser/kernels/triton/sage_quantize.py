"""The pre-pass of the quantised attention (`sage_attention`): q, k and v to 8 bits in one launch.

Grid axis 2 picks the tensor: K minus its per-head mean over the sequence (the mean, computed before, arrives
as K_MEAN), one float32 scale per `QUANT_BLOCK` keys; Q one scale per token, the softmax scale and log2(e)
folded in (q_mult); V either FP8 e4m3 with one scale per channel (V_SCALE), stored transposed ([B*H, D, S_pad],
the K-major operand FP8 tensor-core products take), or copied to 16 bits. Outputs are padded to a multiple of
the attention kernel's blocks; the padding is zero.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_e4m3(x, INTERPRETED: tl.constexpr):
    """Round to float8 e4m3 (nearest, ties to even). Triton 3.9's interpreter drops the carry when a value
    rounds up to the next power of two (125.8 -> 64, not 128), so there the rounding is done in float32 first
    and the cast only stores an exact value."""
    if INTERPRETED:
        quantum = tl.math.exp2(tl.floor(tl.math.log2(tl.maximum(tl.abs(x), 0.015625))) - 3.0)  # 3 mantissa bits
        y = (x / quantum + 12582912.0) - 12582912.0  # nearest-even integer (|y| < 2^22)
        x = tl.minimum(tl.maximum(y * quantum, -448.0), 448.0)
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _quantize_rows(x, out_ptr, scale_ptr, rows, scale_index, scale_mult, store, QK_FP8: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PER_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """x [BLOCK, D] float32 -> 8-bit rows and a float32 scale (times `scale_mult`): one per row, or with
    PER_BLOCK one for the whole block, stored at `scale_index`."""
    d = tl.arange(0, HEAD_DIM)
    amax = tl.max(tl.abs(x), axis=1)
    if PER_BLOCK:
        amax = tl.zeros_like(amax) + tl.max(amax, axis=0)
    amax = tl.maximum(amax, 1e-8)
    if QK_FP8:
        scale = amax / 448.0
        xq = to_e4m3(x / scale[:, None], INTERPRETED)
    else:
        scale = amax / 127.0
        y = x / scale[:, None]
        xq = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero (the cast truncates)
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :], xq, mask=store[:, None])
    if PER_BLOCK:
        tl.store(scale_ptr + scale_index, tl.max(scale, axis=0) * scale_mult)
    else:
        tl.store(scale_ptr + rows, scale * scale_mult, mask=store)


@triton.jit
def quantize_kernel(Q, K, V, s_qb, s_qs, s_qh, s_qd, s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd,
                     K_MEAN, V_SCALE, QQ, Q_SCALE, KQ, K_SCALE, VQ, H, S_Q, SQ_PAD, S, S_pad, q_mult,
                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, QK_FP8: tl.constexpr, PV_FP8: tl.constexpr,
                     INTERPRETED: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    which = tl.program_id(2)  # 0: q, 1: k, 2: v
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tok = pid * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    tok64 = tok.to(tl.int64)
    if which == 0:  # queries, over their own length; programs past its padding store nothing
        valid_q = (tok < S_Q)[:, None]
        xq_in = tl.load(Q + b * s_qb + h * s_qh + tok64[:, None] * s_qs + d[None, :] * s_qd, mask=valid_q, other=0.0)
        _quantize_rows(xq_in.to(tl.float32), QQ, Q_SCALE, bh.to(tl.int64) * SQ_PAD + tok, 0, q_mult, tok < SQ_PAD,
                       QK_FP8, HEAD_DIM, False, INTERPRETED)
    else:
        valid = (tok < S)[:, None]
        rows = bh.to(tl.int64) * S_pad + tok  # row in the padded [B*H*S_pad, D] key/value outputs
        in_pad = tok < S_pad
        if which == 1:
            xk = tl.load(K + b * s_kb + h * s_kh + tok64[:, None] * s_ks + d[None, :] * s_kd, mask=valid, other=0.0)
            xk = tl.where(valid, xk.to(tl.float32) - tl.load(K_MEAN + bh * HEAD_DIM + d)[None, :], 0.0)
            if pid * BLOCK < S_pad:  # one scale per BLOCK keys
                _quantize_rows(xk, KQ, K_SCALE, rows, bh * (S_pad // BLOCK) + pid, 1.0, in_pad, QK_FP8, HEAD_DIM, True,
                               INTERPRETED)
        else:
            xv = tl.load(V + b * s_vb + h * s_vh + tok64[:, None] * s_vs + d[None, :] * s_vd, mask=valid, other=0.0)
            if PV_FP8:
                xq = to_e4m3(xv.to(tl.float32) / tl.load(V_SCALE + bh * HEAD_DIM + d)[None, :], INTERPRETED)
                # transposed: [B*H, D, S_pad], tokens contiguous
                tl.store(VQ + bh.to(tl.int64) * HEAD_DIM * S_pad + d[:, None] * S_pad + tok64[None, :],
                         tl.trans(xq), mask=in_pad[None, :])
            else:
                tl.store(VQ + rows[:, None] * HEAD_DIM + d[None, :], xv.to(VQ.dtype.element_ty), mask=in_pad[:, None])
