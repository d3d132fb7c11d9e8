"""Quantised attention in the SageAttention2 manner: 8-bit Q·K^T, FP8 or 16-bit P·V, FP32 accumulation.

Two launches per call:

1. `quantize_kernel`, one pre-pass over q, k and v (grid axis 2 picks the tensor): K minus its
   per-head mean over the sequence (smoothing: the mean adds `q·mean` to every score of a row, which the
   softmax cancels, and removes the channel offsets that would waste the 8-bit range), then INT8 (or FP8
   e4m3) values with a float32 scale per token for q and per block of `QUANT_BLOCK` keys for k (so a score
   is its integer product times one per-row factor: a single FMA before exp2); v either FP8 e4m3 with one
   scale per channel, stored transposed ([B*H, D, S_pad], the K-major operand FP8 tensor-core products
   take), or copied to 16 bits. The quantised tensors are padded to a multiple of `SEQ_PAD` tokens so no
   block of the attention kernel straddles two heads; the padding is zero and masked in the kernel.
2. `_attention_kernel`, flash attention over the quantised tensors: one program per (query block, batch
   x head); int32 scores turned to float by the 2^23 magic-number trick (integer add + float subtract on
   the ALU/FMA pipes, not the conversion unit that `exp2` also needs); online softmax in base 2 with the
   softmax scale and log2(e) folded into q's scales; P scaled into e4m3's range (448) by shifting the
   exponent, which costs nothing; only the last key block masks the ragged end. Blocks are read through
   TMA descriptors (`USE_TMA`, Hopper) or plain pointers; on Hopper two independent 64-row query tiles per
   program (`two_tiles`), so one tile's Q·K^T overlaps the other's softmax.

The smoothing changes the log-sum-exp by `scale * q·mean(k)` per row; `sage_attention(..., return_lse=True)`
adds it back, so ring attention can merge blocks exactly as with exact attention.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .sage_quantize import quantize_kernel, to_e4m3

E4M3_MAX = 448.0
INT8_MAX = 127.0
LOG2E = 1.4426950408889634
SEQ_PAD = 128  # the largest key/query block: padded lengths are a multiple of every block size used
QUANT_BLOCK = 128  # tokens per program of the pre-pass, and per K scale (a multiple of every BLOCK_N)
_MAGIC = tl.constexpr(0x4B400000)  # bits of 1.5 * 2^23: (i + MAGIC) read as float is 12582912 + i, |i| < 2^22
_MAGIC_F = tl.constexpr(12582912.0)
_LOG2_E4M3_MAX = tl.constexpr(8.807354922057604)  # log2(448)
_LN2 = tl.constexpr(0.6931471805599453)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and schedule of the attention kernel (bench/attention.py sweeps these)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool = False
    two_tiles: bool = False  # block_m split into two query tiles with independent softmax chains


@triton.jit
def _online_softmax_pv(raw, c, m_i, l_i, acc, v_op, valid, QK_FP8: tl.constexpr, PV_FP8: tl.constexpr,
                       INTERPRETED: tl.constexpr, MASKED: tl.constexpr):
    """One key block of one query tile: the scores' online softmax and P·V into acc. `raw` is Q·K^T as the dot
    gave it (int32 for INT8, float32 for FP8); `c` the per-row factor to base-2 logits (q's per-token scale,
    softmax scale * log2(e) folded in, times the block's K scale), so a row's maximum is found on the raw
    products and each score costs one FMA; `v_op` the P·V operand (FP8: V^T [D, BLOCK_N])."""
    if QK_FP8:
        if MASKED:
            raw = tl.where(valid[None, :], raw, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(raw, axis=1) * c)
        offset = m_new
    else:  # |raw| <= 127 * 127 * 128 < 2^22
        if MASKED:
            raw = tl.where(valid[None, :], raw, -4194304)
        m_new = tl.maximum(m_i, tl.max(raw, axis=1).to(tl.float32) * c)
        # (raw + MAGIC) read as float is MAGIC_F + raw: the conversion costs an integer add, not the conversion
        # unit that exp2 also needs; MAGIC_F * c joins the row offset
        raw = (raw + _MAGIC).to(tl.float32, bitcast=True)
        offset = m_new + _MAGIC_F * c
        if MASKED:
            raw = tl.where(valid[None, :], raw, float("-inf"))
    if PV_FP8:
        offset = offset - _LOG2_E4M3_MAX  # P lands in e4m3's range [0, 448] with no extra multiply
    p = tl.math.exp2(raw * c[:, None] - offset[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        acc = tl.dot(to_e4m3(p, INTERPRETED), tl.trans(v_op), acc)
    elif INTERPRETED:  # Triton 3.9's interpreter multiplies bf16 wrongly; bf16 x bf16 is exact in fp32
        acc = tl.dot(p.to(v_op.dtype).to(tl.float32), v_op.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v_op.dtype), v_op, acc)
    return acc, l_i, m_new


@triton.jit
def _load_kv(KQ, VQ, desc_k, desc_v, row0, vt_row0, start_n, S_pad, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
             PV_FP8: tl.constexpr, USE_TMA: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        k = desc_k.load([(row0 + start_n).to(tl.int32), 0])
        if PV_FP8:
            v_op = desc_v.load([vt_row0.to(tl.int32), start_n.to(tl.int32)])
        else:
            v_op = desc_v.load([(row0 + start_n).to(tl.int32), 0])
    else:
        k = tl.load(KQ + (row0 + start_n + offs_n)[:, None] * HEAD_DIM + d[None, :])
        if PV_FP8:
            v_op = tl.load(VQ + (vt_row0 + d)[:, None] * S_pad + (start_n + offs_n)[None, :])
        else:
            v_op = tl.load(VQ + (row0 + start_n + offs_n)[:, None] * HEAD_DIM + d[None, :])
    return k, v_op


@triton.jit
def _attend_blocks(acc, l_i, m_i, q, q_scale, KQ, K_SCALE, VQ, desc_k, desc_v, row0, kblock0, vt_row0, lo, hi, S,
                   S_pad, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                   QK_FP8: tl.constexpr, PV_FP8: tl.constexpr, USE_TMA: tl.constexpr, INTERPRETED: tl.constexpr,
                   MASKED: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        k, v_op = _load_kv(KQ, VQ, desc_k, desc_v, row0, vt_row0, start_n, S_pad, HEAD_DIM, BLOCK_N, PV_FP8, USE_TMA)
        c = q_scale * tl.load(K_SCALE + kblock0 + start_n // SCALE_BLOCK)
        valid = (start_n + tl.arange(0, BLOCK_N)) < S
        acc, l_i, m_i = _online_softmax_pv(tl.dot(q, tl.trans(k)), c, m_i, l_i, acc, v_op, valid, QK_FP8, PV_FP8,
                                           INTERPRETED, MASKED)
    return acc, l_i, m_i


@triton.jit
def _attend_blocks_two_tiles(acc1, l1, m1, q1, qs1, acc2, l2, m2, q2, qs2, KQ, K_SCALE, VQ, desc_k, desc_v, row0,
                             kblock0, vt_row0, lo, hi, S, S_pad, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                             SCALE_BLOCK: tl.constexpr, QK_FP8: tl.constexpr, PV_FP8: tl.constexpr,
                             USE_TMA: tl.constexpr, INTERPRETED: tl.constexpr):
    """Two query tiles over the same key blocks, their dependency chains independent: the second tile's Q·K^T
    can run on the tensor cores while the first tile's softmax runs (FlashAttention-3's intra-warpgroup
    overlap, left to Triton's scheduler). Unmasked blocks only."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        k, v_op = _load_kv(KQ, VQ, desc_k, desc_v, row0, vt_row0, start_n, S_pad, HEAD_DIM, BLOCK_N, PV_FP8, USE_TMA)
        k_scale = tl.load(K_SCALE + kblock0 + start_n // SCALE_BLOCK)
        valid = (start_n + tl.arange(0, BLOCK_N)) < S
        raw1 = tl.dot(q1, tl.trans(k))
        raw2 = tl.dot(q2, tl.trans(k))
        acc1, l1, m1 = _online_softmax_pv(raw1, qs1 * k_scale, m1, l1, acc1, v_op, valid, QK_FP8, PV_FP8,
                                          INTERPRETED, False)
        acc2, l2, m2 = _online_softmax_pv(raw2, qs2 * k_scale, m2, l2, acc2, v_op, valid, QK_FP8, PV_FP8,
                                          INTERPRETED, False)
    return acc1, l1, m1, acc2, l2, m2


@triton.jit
def _attention_kernel(QQ, Q_SCALE, KQ, K_SCALE, VQ, V_SCALE, O, LSE, desc_q, desc_k, desc_v,
                      s_ob, s_os, s_oh, s_od, H, S_Q, SQ_PAD, S, S_pad,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_FP8: tl.constexpr,
                      PV_FP8: tl.constexpr, USE_TMA: tl.constexpr, RETURN_LSE: tl.constexpr,
                      TWO_TILES: tl.constexpr, TILE: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                      INTERPRETED: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_row0 = bh.to(tl.int64) * SQ_PAD  # this head's first row in the padded q
    row0 = bh.to(tl.int64) * S_pad  # ... in the padded k and v
    vt_row0 = bh.to(tl.int64) * HEAD_DIM  # ... and in the transposed FP8 v
    kblock0 = bh.to(tl.int64) * (S_pad // SCALE_BLOCK)  # this head's first K scale
    full = (S // BLOCK_N) * BLOCK_N
    if TWO_TILES:
        m_a = start_m * BLOCK_M
        q1, qs1 = _load_q(QQ, Q_SCALE, desc_q, q_row0, m_a, HEAD_DIM, TILE, USE_TMA)
        q2, qs2 = _load_q(QQ, Q_SCALE, desc_q, q_row0, m_a + TILE, HEAD_DIM, TILE, USE_TMA)
        m1 = tl.full([TILE], float("-inf"), tl.float32)
        m2 = tl.full([TILE], float("-inf"), tl.float32)
        l1 = tl.zeros([TILE], tl.float32)
        l2 = tl.zeros([TILE], tl.float32)
        acc1 = tl.zeros([TILE, HEAD_DIM], tl.float32)
        acc2 = tl.zeros([TILE, HEAD_DIM], tl.float32)
        acc1, l1, m1, acc2, l2, m2 = _attend_blocks_two_tiles(
            acc1, l1, m1, q1, qs1, acc2, l2, m2, q2, qs2, KQ, K_SCALE, VQ, desc_k, desc_v, row0, kblock0, vt_row0,
            0, full, S, S_pad, HEAD_DIM, BLOCK_N, SCALE_BLOCK, QK_FP8, PV_FP8, USE_TMA, INTERPRETED)
        if full < S:  # the ragged end: the only block that masks
            acc1, l1, m1 = _attend_blocks(acc1, l1, m1, q1, qs1, KQ, K_SCALE, VQ, desc_k, desc_v, row0, kblock0,
                                          vt_row0, full, full + BLOCK_N, S, S_pad, HEAD_DIM, BLOCK_N, SCALE_BLOCK,
                                          QK_FP8, PV_FP8, USE_TMA, INTERPRETED, True)
            acc2, l2, m2 = _attend_blocks(acc2, l2, m2, q2, qs2, KQ, K_SCALE, VQ, desc_k, desc_v, row0, kblock0,
                                          vt_row0, full, full + BLOCK_N, S, S_pad, HEAD_DIM, BLOCK_N, SCALE_BLOCK,
                                          QK_FP8, PV_FP8, USE_TMA, INTERPRETED, True)
        _store_tile(acc1, l1, m1, O, LSE, V_SCALE, b, h, bh, m_a, S_Q, s_ob, s_os, s_oh, s_od, HEAD_DIM, TILE, PV_FP8,
                    RETURN_LSE)
        _store_tile(acc2, l2, m2, O, LSE, V_SCALE, b, h, bh, m_a + TILE, S_Q, s_ob, s_os, s_oh, s_od, HEAD_DIM, TILE,
                    PV_FP8, RETURN_LSE)
    else:
        q, q_scale = _load_q(QQ, Q_SCALE, desc_q, q_row0, start_m * BLOCK_M, HEAD_DIM, BLOCK_M, USE_TMA)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, q_scale, KQ, K_SCALE, VQ, desc_k, desc_v, row0, kblock0,
                                       vt_row0, 0, full, S, S_pad, HEAD_DIM, BLOCK_N, SCALE_BLOCK, QK_FP8, PV_FP8,
                                       USE_TMA, INTERPRETED, False)
        if full < S:  # the ragged end: the only block that masks
            acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, q_scale, KQ, K_SCALE, VQ, desc_k, desc_v, row0, kblock0,
                                           vt_row0, full, full + BLOCK_N, S, S_pad, HEAD_DIM, BLOCK_N, SCALE_BLOCK,
                                           QK_FP8, PV_FP8, USE_TMA, INTERPRETED, True)
        _store_tile(acc, l_i, m_i, O, LSE, V_SCALE, b, h, bh, start_m * BLOCK_M, S_Q, s_ob, s_os, s_oh, s_od,
                    HEAD_DIM, BLOCK_M, PV_FP8, RETURN_LSE)


@triton.jit
def _load_q(QQ, Q_SCALE, desc_q, q_row0, m0, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    rows = m0 + tl.arange(0, ROWS)
    if USE_TMA:
        q = desc_q.load([(q_row0 + m0).to(tl.int32), 0])
    else:
        q = tl.load(QQ + (q_row0 + rows)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])
    return q, tl.load(Q_SCALE + q_row0 + rows)


@triton.jit
def _store_tile(acc, l_i, m_i, O, LSE, V_SCALE, b, h, bh, m0, S_Q, s_ob, s_os, s_oh, s_od, HEAD_DIM: tl.constexpr,
                ROWS: tl.constexpr, PV_FP8: tl.constexpr, RETURN_LSE: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    offs_m = m0 + tl.arange(0, ROWS)
    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * tl.load(V_SCALE + bh * HEAD_DIM + d)[None, :]
    valid = offs_m < S_Q
    o_ptrs = O + b * s_ob + h * s_oh + offs_m.to(tl.int64)[:, None] * s_os + d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=valid[:, None])
    if RETURN_LSE:
        lse2 = m_i + tl.math.log2(l_i)
        if PV_FP8:
            lse2 = lse2 - _LOG2_E4M3_MAX
        tl.store(LSE + bh.to(tl.int64) * S_Q + offs_m, lse2 * _LN2, mask=valid)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, name: str
               ) -> tuple[int, int, int, int, int]:
    """(B, heads, D, Sq, Sk) of q, k, v in `layout`, checked (shapes, head dim); `name` starts the messages.
    Shared by the dense and the block-sparse kernel's entry points."""
    if layout not in ("BSND", "BNSD"):
        raise ValueError(f"layout must be BSND or BNSD, got {layout!r}")
    seq_dim = 1 if layout == "BSND" else 2
    if q.dim() != 4 or k.shape != v.shape or q.shape[:seq_dim] + q.shape[seq_dim + 1:] != k.shape[:seq_dim] + k.shape[seq_dim + 1:]:
        raise ValueError(f"{name} takes q [B, Sq, N, D] and k, v [B, Sk, N, D] (in {layout}); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    D = q.shape[3]
    if D not in HEAD_DIMS:
        raise ValueError(f"{name} supports head dims {HEAD_DIMS}, not {D}")
    return q.shape[0], q.shape[3 - seq_dim], D, q.shape[seq_dim], k.shape[seq_dim]


def _strides(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, seq, head, dim) strides of x in `layout`."""
    sb, s1, s2, sd = x.stride()
    return (sb, s1, s2, sd) if layout == "BSND" else (sb, s2, s1, sd)


def _tma_descriptor(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


# The fastest config per (compute capability, FP8 P·V), from bench/attention.py's sweep on an H200 (2026-12-04,
# docs/benchmarks.md): two query tiles of 64 rows per program through TMA descriptors (803 TOPS against 758 for
# the best single-tile config at the 1.3B shape); the bench updates it in-process while it sweeps. Elsewhere
# (other GPUs, the interpreter) a portable config.
TUNED: dict[tuple[tuple[int, int], bool], KernelConfig] = {
    ((9, 0), True): KernelConfig(block_m=128, block_n=128, num_warps=4, num_stages=3, use_tma=True, two_tiles=True),
    ((9, 0), False): KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=3, use_tma=True, two_tiles=True),
}
HEAD_DIMS = (32, 64, 128)  # 8-bit tensor-core products need K >= 32


def default_config(device: torch.device, pv_fp8: bool) -> KernelConfig:
    if device.type != "cuda":
        return KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=1)
    return TUNED.get((torch.cuda.get_device_capability(device), pv_fp8),
                     KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=3))


class Quantized(NamedTuple):
    """What the pre-pass makes: 8-bit q and k with their float32 scales (q's carry softmax scale * log2(e)), v
    in FP8 (transposed, per-channel `v_scale`) or 16 bits, k's per-head mean, the padded lengths, the scale."""

    qq: torch.Tensor
    q_scale: torch.Tensor
    kq: torch.Tensor
    k_scale: torch.Tensor
    vq: torch.Tensor
    v_scale: torch.Tensor
    k_mean: torch.Tensor
    sq_pad: int
    sk_pad: int
    scale: float


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv_fp8: bool, layout: str, scale: Optional[float],
             qk_fp8: bool) -> Quantized:
    """The pre-pass (`quantize_kernel`) over q, k and v in one launch; shapes as `sage_attention` takes them."""
    seq_dim = 1 if layout == "BSND" else 2
    B, H, D = q.shape[0], q.shape[3 - seq_dim], q.shape[3]
    s_q, s_k = q.shape[seq_dim], k.shape[seq_dim]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    sq_pad, sk_pad = (triton.cdiv(n, SEQ_PAD) * SEQ_PAD for n in (s_q, s_k))
    dev = q.device
    k_mean = k.mean(dim=seq_dim, dtype=torch.float32).reshape(B * H, D).contiguous()  # [B, N, D] either layout
    qk_dtype = torch.float8_e4m3fn if qk_fp8 else torch.int8
    qq = torch.empty(B * H * sq_pad, D, dtype=qk_dtype, device=dev)
    kq = torch.empty(B * H * sk_pad, D, dtype=qk_dtype, device=dev)
    q_scale = torch.empty(B * H * sq_pad, dtype=torch.float32, device=dev)
    k_scale = torch.empty(B * H * (sk_pad // QUANT_BLOCK), dtype=torch.float32, device=dev)
    if pv_fp8:
        v_amax = torch.linalg.vector_norm(v, ord=float("inf"), dim=seq_dim, dtype=torch.float32)
        v_scale = (v_amax.clamp(min=1e-8) / E4M3_MAX).reshape(B * H, D).contiguous()
        vq = torch.empty(B * H * D, sk_pad, dtype=torch.float8_e4m3fn, device=dev)
    else:
        v_scale = q_scale  # not read
        vq = torch.empty(B * H * sk_pad, D, dtype=torch.float16 if v.dtype == torch.float16 else torch.bfloat16,
                         device=dev)
    quantize_kernel[(max(sq_pad, sk_pad) // QUANT_BLOCK, B * H, 3)](
        q, k, v, *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), k_mean, v_scale,
        qq, q_scale, kq, k_scale, vq, H, s_q, sq_pad, s_k, sk_pad, scale * LOG2E,
        HEAD_DIM=D, BLOCK=QUANT_BLOCK, QK_FP8=qk_fp8, PV_FP8=pv_fp8, INTERPRETED=_INTERPRETED, num_warps=8)
    return Quantized(qq, q_scale, kq, k_scale, vq, v_scale, k_mean, sq_pad, sk_pad, scale)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv_fp8: bool, layout: str = "BSND",
                   scale: Optional[float] = None, qk_fp8: bool = False, return_lse: bool = False,
                   config: Optional[KernelConfig] = None):
    """softmax(q k^T * scale) v with 8-bit Q·K^T and FP8 (pv_fp8) or 16-bit P·V.

    q: [B, Sq, N, D] ("BSND") or [B, N, Sq, D] ("BNSD"); k, v: the same with Sk keys; any strides; D one of
    `HEAD_DIMS`; fp32, bf16 or fp16. Returns the output in q's layout and dtype, and with `return_lse` the
    natural-log log-sum-exp of the scaled scores, [B, N, Sq] float32.
    """
    B, H, D, s_q, s_k = _check_qkv(q, k, v, layout, "sage_attention")
    if s_q == 0 or s_k == 0:
        raise ValueError("sage_attention needs at least one query and one key")
    cfg = config or default_config(q.device, pv_fp8)
    qq, q_scale, kq, k_scale, vq, v_scale, k_mean, sq_pad, sk_pad, scale = quantize(q, k, v, pv_fp8, layout, scale,
                                                                                    qk_fp8)
    dev = q.device
    out = torch.empty_like(q)
    lse = torch.empty(B, H, s_q, dtype=torch.float32, device=dev) if return_lse else q_scale
    if cfg.use_tma:
        desc_q = _tma_descriptor(qq, [cfg.block_m // 2 if cfg.two_tiles else cfg.block_m, D])
        desc_k = _tma_descriptor(kq, [cfg.block_n, D])
        desc_v = _tma_descriptor(vq, [D, cfg.block_n] if pv_fp8 else [cfg.block_n, D])
    else:
        desc_q = desc_k = desc_v = None
    _attention_kernel[(sq_pad // cfg.block_m, B * H)](
        qq, q_scale, kq, k_scale, vq, v_scale, out, lse, desc_q, desc_k, desc_v,
        *_strides(out, layout), H, s_q, sq_pad, s_k, sk_pad,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QK_FP8=qk_fp8, PV_FP8=pv_fp8,
        USE_TMA=cfg.use_tma, RETURN_LSE=return_lse, TWO_TILES=cfg.two_tiles, TILE=cfg.block_m // 2, SCALE_BLOCK=QUANT_BLOCK,
        INTERPRETED=_INTERPRETED,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not return_lse:
        return out
    # The smoothing removed q·mean(k) from every score of a row: add it back to the log-sum-exp.
    q_bnsd = q if layout == "BNSD" else q.transpose(1, 2)
    correction = (q_bnsd.float() @ k_mean.reshape(B, H, D, 1)).squeeze(-1) * scale
    return out, lse + correction
