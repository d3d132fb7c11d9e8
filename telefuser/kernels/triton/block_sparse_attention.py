"""Block-sparse flash attention: each query block attends only to the key blocks its layout lists.

The layout is built once from a boolean block mask `[Mq, Mk]` (or per head `[N, Mq, Mk]`) at `block_size`
tokens per block (`telefuser.ops.sparse_attention.layout_from_mask`): for each query block, the number of
key blocks it computes (`counts [H, Mq]`) and their indices (`indices [H, Mq, max_count]`, ascending,
padded with 0). One program handles `BLOCK_M` query rows of one (batch, head) and walks only its row's
listed key blocks: a skipped block costs nothing but not being in the list, so the time scales with the
computed blocks.

The inner loop is the quantised kernel's (`sage_attention.py`) in 16 bits:
- the listed blocks' key tiles form one flat loop (block index = j // sub-tiles), which Triton pipelines;
  only the last listed block can hold the ragged end of the keys (the list is ascending and only block
  Mk - 1 is short), so the flat loop never masks and the last block alone tests its tiles;
- softmax scale * log2(e) is applied as one FMA per score before exp2 (the row maximum is taken on the raw
  products, scaled once per row);
- on Hopper (`TUNED`) blocks are read through TMA descriptors over the [B*S, N*D] matrix of a BSND tensor
  (views of a packed qkv tensor included; other strides fall back to pointer loads), and a program runs
  two independent 64-row query tiles over the same key tiles (`KernelConfig.two_tiles`), so one tile's
  Q·K^T can overlap the other's softmax.

q, k, v are [B, S, N, D] (BSND) read through their strides (head dim contiguous); D a power of two in
16..256; fp32 / bf16 / fp16 (fp32: IEEE dots, pointer loads). Online softmax statistics and the accumulator
in fp32, P rounded to the input dtype before P·V. Optionally the natural-log log-sum-exp [B, N, Sq] fp32;
a query block whose list is empty gets output 0 and lse -inf.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class KernelConfig:
    """Tiles and schedule (bench/sparse.py sweeps these). `block_m` query rows per program (two tiles of
    block_m / 2 with `two_tiles`), `block_n` keys per tile; both are clamped to divide the mask's block."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    use_tma: bool = False
    two_tiles: bool = False


# Per (compute capability, head dim). sm90, head dim 128: the fastest of bench/sparse.py's sweep on an H200
# (2026-12-04: 44.2 ms = 0.86x cuDNN on the 480p 14B dense ceiling; 128-key tiles 0.57x, one 128-row tile with
# 8 warps 0.76x, pointer loads instead of TMA 0.79x; docs/benchmarks.md). Head dim 64 takes the same shape, unswept.
TUNED: dict[tuple[tuple[int, int], int], KernelConfig] = {
    ((9, 0), 128): KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=3, use_tma=True, two_tiles=True),
    ((9, 0), 64): KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=3, use_tma=True, two_tiles=True),
}


def default_config(q: torch.Tensor) -> KernelConfig:
    """The tuned config for q's device and head dim; elsewhere a portable single-tile one (the interpreter: the
    cheapest tiles)."""
    d = q.shape[-1]
    if q.device.type != "cuda":
        return KernelConfig(block_m=128 if d <= 64 else 64, block_n=64, num_warps=4, num_stages=1)
    cc = torch.cuda.get_device_capability(q.device)
    return TUNED.get((cc, d), KernelConfig(block_m=128 if d <= 64 else 64, block_n=64, num_warps=4,
                                           num_stages=3 if cc >= (8, 0) else 2))


@triton.jit
def _load_rows(ptr, desc, b, h, row0, n_rows, s_b, s_s, s_n, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               USE_TMA: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """Rows row0 .. row0 + ROWS of head h of batch b, [ROWS, HEAD_DIM]; past `n_rows` zero (MASKED) or not read
    as such (TMA reads the next batch's rows or zeros there: the caller masks what they feed)."""
    if USE_TMA:
        x = desc.load([(b * n_rows + row0).to(tl.int32), (h * HEAD_DIM).to(tl.int32)])
    else:
        rows = row0 + tl.arange(0, ROWS)
        ptrs = ptr + b * s_b + h * s_n + rows.to(tl.int64)[:, None] * s_s + tl.arange(0, HEAD_DIM)[None, :]
        if MASKED:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    if UPCAST:  # see _interpreter_upcast
        x = x.to(tl.float32)
    return x


@triton.jit
def _softmax_step(q, k, v, m_i, l_i, acc, c, valid, MASKED: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr):
    """One key tile of one query tile: scores, online softmax in base 2 (c = scale * log2(e) > 0, so the row
    maximum of the raw products times c is the maximum of the logits, and each logit costs one FMA), P·V."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)  # finite: every tile that gets here holds a valid key
    p = tl.math.exp2(s * c - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    elif UPCAST:  # bf16 only: P rounded to bf16 as on the GPU, multiplied in fp32 (exact for bf16 products)
        acc = tl.dot(p.to(tl.bfloat16).to(tl.float32), v, acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)  # P rounded to the input dtype for the second dot, as flash kernels do
    return acc, l_i, m_new


@triton.jit
def _store_rows(acc, l_i, m_i, o_ptr, lse_ptr, b, h, bh, m0, Sq, o_sb, o_ss, o_sn, ROWS: tl.constexpr,
                HEAD_DIM: tl.constexpr, RETURN_LSE: tl.constexpr):
    rows = m0 + tl.arange(0, ROWS)
    valid = rows < Sq
    safe_l = tl.where(l_i > 0, l_i, 1.0)  # an empty list leaves l = 0 and acc = 0: output 0
    out = acc / safe_l[:, None]
    ptrs = o_ptr + b * o_sb + h * o_sn + rows.to(tl.int64)[:, None] * o_ss + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(ptrs, out.to(o_ptr.dtype.element_ty), mask=valid[:, None])
    if RETURN_LSE:
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(safe_l)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + bh.to(tl.int64) * Sq + rows, lse, mask=valid)


@triton.jit
def _block_sparse_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, counts_ptr, indices_ptr, desc_q, desc_k, desc_v,
    Sq, Sk, N, scale_log2,
    q_sb, q_ss, q_sn, k_sb, k_ss, k_sn, v_sb, v_ss, v_sn, o_sb, o_ss, o_sn,
    cnt_sh, idx_sh, idx_sm,
    MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    TWO_TILES: tl.constexpr, TILE: tl.constexpr, USE_TMA: tl.constexpr,
    IEEE: tl.constexpr, RETURN_LSE: tl.constexpr, UPCAST: tl.constexpr,
    SUBS: tl.constexpr,  # key tiles per mask block
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // N).to(tl.int64)
    h = (bh % N).to(tl.int64)
    m0 = pid_m * BLOCK_M
    row_block = m0 // MASK_BLOCK

    # The layout is shared by every head (stride 0 over heads) or one per head.
    count = tl.load(counts_ptr + h * cnt_sh + row_block)
    row_indices = indices_ptr + h * idx_sh + row_block * idx_sm
    c = scale_log2
    no_mask = tl.full([BLOCK_N], True, tl.int1)
    if TWO_TILES:
        q1 = _load_rows(q_ptr, desc_q, b, h, m0, Sq, q_sb, q_ss, q_sn, TILE, HEAD_DIM, USE_TMA, True, UPCAST)
        q2 = _load_rows(q_ptr, desc_q, b, h, m0 + TILE, Sq, q_sb, q_ss, q_sn, TILE, HEAD_DIM, USE_TMA, True, UPCAST)
        m1 = tl.full([TILE], float("-inf"), tl.float32)
        m2 = tl.full([TILE], float("-inf"), tl.float32)
        l1 = tl.zeros([TILE], tl.float32)
        l2 = tl.zeros([TILE], tl.float32)
        acc1 = tl.zeros([TILE, HEAD_DIM], tl.float32)
        acc2 = tl.zeros([TILE, HEAD_DIM], tl.float32)
    else:
        q1 = _load_rows(q_ptr, desc_q, b, h, m0, Sq, q_sb, q_ss, q_sn, BLOCK_M, HEAD_DIM, USE_TMA, True, UPCAST)
        m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l1 = tl.zeros([BLOCK_M], tl.float32)
        acc1 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Every listed block but the last is whole: one flat, unmasked loop over their key tiles.
    for j in tl.range(0, tl.maximum(count - 1, 0) * SUBS):
        start_n = tl.load(row_indices + j // SUBS) * MASK_BLOCK + (j % SUBS) * BLOCK_N
        k = _load_rows(k_ptr, desc_k, b, h, start_n, Sk, k_sb, k_ss, k_sn, BLOCK_N, HEAD_DIM, USE_TMA, False, UPCAST)
        v = _load_rows(v_ptr, desc_v, b, h, start_n, Sk, v_sb, v_ss, v_sn, BLOCK_N, HEAD_DIM, USE_TMA, False, UPCAST)
        acc1, l1, m1 = _softmax_step(q1, k, v, m1, l1, acc1, c, no_mask, False, IEEE, UPCAST)
        if TWO_TILES:
            acc2, l2, m2 = _softmax_step(q2, k, v, m2, l2, acc2, c, no_mask, False, IEEE, UPCAST)
    # The last listed block may be the ragged one (block Mk - 1): its tiles test their end.
    if count > 0:
        last = tl.load(row_indices + count - 1) * MASK_BLOCK
        for sub in range(0, SUBS):
            start_n = last + sub * BLOCK_N
            if start_n + BLOCK_N <= Sk:
                k = _load_rows(k_ptr, desc_k, b, h, start_n, Sk, k_sb, k_ss, k_sn, BLOCK_N, HEAD_DIM, USE_TMA, False,
                               UPCAST)
                v = _load_rows(v_ptr, desc_v, b, h, start_n, Sk, v_sb, v_ss, v_sn, BLOCK_N, HEAD_DIM, USE_TMA, False,
                               UPCAST)
                acc1, l1, m1 = _softmax_step(q1, k, v, m1, l1, acc1, c, no_mask, False, IEEE, UPCAST)
                if TWO_TILES:
                    acc2, l2, m2 = _softmax_step(q2, k, v, m2, l2, acc2, c, no_mask, False, IEEE, UPCAST)
            elif start_n < Sk:  # the ragged end; a tile wholly past it is skipped
                valid = start_n + tl.arange(0, BLOCK_N) < Sk
                # pointer loads zero past the end (TMA would read the next batch's rows: masked scores, P = 0)
                k = _load_rows(k_ptr, desc_k, b, h, start_n, Sk, k_sb, k_ss, k_sn, BLOCK_N, HEAD_DIM, False, True,
                               UPCAST)
                v = _load_rows(v_ptr, desc_v, b, h, start_n, Sk, v_sb, v_ss, v_sn, BLOCK_N, HEAD_DIM, False, True,
                               UPCAST)
                acc1, l1, m1 = _softmax_step(q1, k, v, m1, l1, acc1, c, valid, True, IEEE, UPCAST)
                if TWO_TILES:
                    acc2, l2, m2 = _softmax_step(q2, k, v, m2, l2, acc2, c, valid, True, IEEE, UPCAST)

    if TWO_TILES:
        _store_rows(acc1, l1, m1, o_ptr, lse_ptr, b, h, bh, m0, Sq, o_sb, o_ss, o_sn, TILE, HEAD_DIM, RETURN_LSE)
        _store_rows(acc2, l2, m2, o_ptr, lse_ptr, b, h, bh, m0 + TILE, Sq, o_sb, o_ss, o_sn, TILE, HEAD_DIM,
                    RETURN_LSE)
    else:
        _store_rows(acc1, l1, m1, o_ptr, lse_ptr, b, h, bh, m0, Sq, o_sb, o_ss, o_sn, BLOCK_M, HEAD_DIM, RETURN_LSE)


def _interpreter_upcast(dtype: torch.dtype) -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) computes `tl.dot` of two bfloat16 tiles wrongly (1e10 off for
    unit inputs; float16 and float32 are right). There the bf16 tiles go to the dot as float32: the same values
    (products of bf16 numbers are exact in float32, and the GPU's dot accumulates in float32)."""
    return dtype == torch.bfloat16 and _INTERPRETED


def fit_config(cfg: KernelConfig, block_size: int, dtype: torch.dtype) -> KernelConfig:
    """`cfg` with tiles that divide the mask's block (a block of 16 or 32 gets one tile per block), two tiles
    only where each holds at least 16 rows, TMA only for 16-bit inputs."""
    block_m, block_n = min(cfg.block_m, block_size), min(cfg.block_n, block_size)
    two = cfg.two_tiles and block_m >= 32
    return replace(cfg, block_m=block_m, block_n=block_n, two_tiles=two,
                   use_tma=cfg.use_tma and dtype in (torch.bfloat16, torch.float16))


def _tma_view_ok(t: torch.Tensor) -> bool:
    """A BSND tensor is one [B*S, N*D] matrix with row stride stride(1) (what the 2-D descriptor reads) when its
    heads are packed in a token and its batches follow each other; TMA also needs 16-byte alignment."""
    b, s, n, d = t.shape
    item = t.element_size()
    return (t.stride(3) == 1 and t.stride(2) == d and (b == 1 or t.stride(0) == s * t.stride(1))
            and (t.stride(1) * item) % 16 == 0 and t.data_ptr() % 16 == 0)


def _descriptor(t: torch.Tensor, rows: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, s, n, d = t.shape
    return TensorDescriptor(t, [b * s, n * d], [t.stride(1), 1], [rows, d])


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                           indices: torch.Tensor, block_size: int, scale: Optional[float] = None,
                           return_lse: bool = False, config: Optional[KernelConfig] = None):
    """softmax(q k^T * scale) v over the key blocks listed for each query block; q [B, Sq, N, D], k, v
    [B, Sk, N, D] (BSND, any strides with a contiguous head dim); `counts` int32 [H, Mq] and `indices` int32
    [H, Mq, W] (H = 1: every head alike; see `telefuser.ops.sparse_attention.layout_from_mask`; ascending),
    blocks of `block_size` tokens. Returns out [B, Sq, N, D] in q's dtype (contiguous), and with `return_lse`
    also lse [B, N, Sq] float32 (natural log). `config`: tiles and schedule (default: `TUNED` / portable)."""
    mq = math.ceil(q.shape[1] / block_size)  # the indices are trusted (built by layout_from_mask): no device sync
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q [B, Sq, N, D] and k, v [B, Sk, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if counts.dim() != 2 or counts.shape[1] != mq or indices.dim() != 3 or indices.shape[:2] != counts.shape:
        raise ValueError(f"counts [H, {mq}] and indices [H, {mq}, W] expected for {q.shape[1]} queries in blocks of "
                         f"{block_size}, got {tuple(counts.shape)} and {tuple(indices.shape)}")
    if counts.shape[0] not in (1, q.shape[2]):
        raise ValueError(f"a per-head layout needs one row list per head ({q.shape[2]}), got {counts.shape[0]}")
    b, sq, n, d = q.shape
    sk = k.shape[1]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"the block-sparse kernel takes head dims 16..256, powers of two; got {d}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among float32/bfloat16/float16, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s head dim must be contiguous (stride 1), got strides {tuple(t.stride())}")
    bs = int(block_size)
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two of at least 16, got {bs}")
    scale = d ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive (the row maximum is taken before scaling), got {scale}")
    cfg = fit_config(config or default_config(q), bs, q.dtype)
    use_tma = cfg.use_tma and all(_tma_view_ok(t) for t in (q, k, v))
    counts = counts.to(device=q.device, dtype=torch.int32)
    indices = indices.to(device=q.device, dtype=torch.int32)
    out = torch.empty(b, sq, n, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, n, sq, device=q.device, dtype=torch.float32) if return_lse else out  # unused when False
    tile = cfg.block_m // 2 if cfg.two_tiles else cfg.block_m
    descs = ((_descriptor(q, tile), _descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n)) if use_tma
             else (None, None, None))
    shared = counts.shape[0] == 1
    _block_sparse_attn_kernel[(triton.cdiv(sq, cfg.block_m), b * n)](
        q, k, v, out, lse, counts, indices, *descs, sq, sk, n, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        0 if shared else counts.stride(0), 0 if shared else indices.stride(0), indices.stride(1),
        MASK_BLOCK=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=d, TWO_TILES=cfg.two_tiles, TILE=tile,
        USE_TMA=use_tma, IEEE=q.dtype == torch.float32, RETURN_LSE=return_lse,
        UPCAST=_interpreter_upcast(q.dtype), SUBS=bs // cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (out, lse) if return_lse else out
