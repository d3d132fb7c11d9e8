"""Block-sparse quantised attention: the SageAttention2-style kernel (`sage_attention.py`) walking, for each query
block, only the key blocks a layout lists (`telefuser.ops.sparse_attention.layout_from_mask`: `counts [H, Mq]`,
`indices [H, Mq, W]`, ascending).

The same pre-pass (K smoothed by its per-head mean over the whole sequence: a constant per query row, which the
softmax cancels whatever keys a row sees; 8-bit Q and K, V in FP8 or 16 bits) and the same per-tile arithmetic
(`_online_softmax_pv`: one FMA per score before exp2, P shifted into e4m3's range); what changes is the loop:
one flat loop over the listed blocks' key tiles (block = j // tiles per block), never masked, then the last
listed block alone, which may be block Mk - 1 with the ragged end of the keys (the list is ascending). The
quantised tensors are zero-padded to 128 tokens, so every tile loads in bounds; only scores past the end are
masked. On Hopper two 64-row query tiles per program and TMA descriptors, as the dense kernel (`TUNED`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch
import triton
import triton.language as tl

from .sage_attention import (_INTERPRETED, QUANT_BLOCK, KernelConfig, _check_qkv, _load_kv, _load_q,
                             _online_softmax_pv, _store_tile, _strides, _tma_descriptor, default_config, quantize)

MIN_BLOCK = 32  # every key tile holds >= 32 keys: the K dim of the FP8 P·V product


@triton.jit
def _tile(q, qs, k, v_op, k_scale, m_i, l_i, acc, valid, QK_FP8: tl.constexpr, PV_FP8: tl.constexpr,
          INTERPRETED: tl.constexpr, MASKED: tl.constexpr):
    return _online_softmax_pv(tl.dot(q, tl.trans(k)), qs * k_scale, m_i, l_i, acc, v_op, valid, QK_FP8, PV_FP8,
                              INTERPRETED, MASKED)


@triton.jit
def _sparse_kernel(QQ, Q_SCALE, KQ, K_SCALE, VQ, V_SCALE, O, LSE, desc_q, desc_k, desc_v, counts_ptr, indices_ptr,
                   s_ob, s_os, s_oh, s_od, H, S_Q, SQ_PAD, S, S_pad, cnt_sh, idx_sh, idx_sm,
                   MASK_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   QK_FP8: tl.constexpr, PV_FP8: tl.constexpr, USE_TMA: tl.constexpr, RETURN_LSE: tl.constexpr,
                   TWO_TILES: tl.constexpr, TILE: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                   INTERPRETED: tl.constexpr, SUBS: tl.constexpr, ROWS1: tl.constexpr):
    # SUBS: key tiles per mask block; ROWS1: rows of the first query tile (TILE with two tiles, else BLOCK_M)
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_row0 = bh.to(tl.int64) * SQ_PAD
    row0 = bh.to(tl.int64) * S_pad
    vt_row0 = bh.to(tl.int64) * HEAD_DIM
    kblock0 = bh.to(tl.int64) * (S_pad // SCALE_BLOCK)
    m0 = start_m * BLOCK_M
    row_block = m0 // MASK_BLOCK
    count = tl.load(counts_ptr + h * cnt_sh + row_block)
    row_indices = indices_ptr + h * idx_sh + row_block * idx_sm
    q1, qs1 = _load_q(QQ, Q_SCALE, desc_q, q_row0, m0, HEAD_DIM, ROWS1, USE_TMA)
    m1 = tl.full([ROWS1], float("-inf"), tl.float32)
    l1 = tl.zeros([ROWS1], tl.float32)
    acc1 = tl.zeros([ROWS1, HEAD_DIM], tl.float32)
    if TWO_TILES:
        q2, qs2 = _load_q(QQ, Q_SCALE, desc_q, q_row0, m0 + TILE, HEAD_DIM, TILE, USE_TMA)
        m2 = tl.full([TILE], float("-inf"), tl.float32)
        l2 = tl.zeros([TILE], tl.float32)
        acc2 = tl.zeros([TILE, HEAD_DIM], tl.float32)
    no_mask = tl.full([BLOCK_N], True, tl.int1)

    # Every listed block but the last is whole: one flat, unmasked loop over their key tiles.
    for j in tl.range(0, tl.maximum(count - 1, 0) * SUBS):
        start_n = tl.load(row_indices + j // SUBS) * MASK_BLOCK + (j % SUBS) * BLOCK_N
        k, v_op = _load_kv(KQ, VQ, desc_k, desc_v, row0, vt_row0, start_n, S_pad, HEAD_DIM, BLOCK_N, PV_FP8, USE_TMA)
        k_scale = tl.load(K_SCALE + kblock0 + start_n // SCALE_BLOCK)
        acc1, l1, m1 = _tile(q1, qs1, k, v_op, k_scale, m1, l1, acc1, no_mask, QK_FP8, PV_FP8, INTERPRETED, False)
        if TWO_TILES:
            acc2, l2, m2 = _tile(q2, qs2, k, v_op, k_scale, m2, l2, acc2, no_mask, QK_FP8, PV_FP8, INTERPRETED, False)
    # The last listed block may be the ragged one: its tiles test their end (loads stay inside the zero padding).
    if count > 0:
        last = tl.load(row_indices + count - 1) * MASK_BLOCK
        for sub in range(0, SUBS):
            start_n = last + sub * BLOCK_N
            if start_n < S:
                k, v_op = _load_kv(KQ, VQ, desc_k, desc_v, row0, vt_row0, start_n, S_pad, HEAD_DIM, BLOCK_N, PV_FP8,
                                   USE_TMA)
                k_scale = tl.load(K_SCALE + kblock0 + start_n // SCALE_BLOCK)
                valid = start_n + tl.arange(0, BLOCK_N) < S
                if start_n + BLOCK_N <= S:
                    acc1, l1, m1 = _tile(q1, qs1, k, v_op, k_scale, m1, l1, acc1, valid, QK_FP8, PV_FP8, INTERPRETED,
                                         False)
                    if TWO_TILES:
                        acc2, l2, m2 = _tile(q2, qs2, k, v_op, k_scale, m2, l2, acc2, valid, QK_FP8, PV_FP8,
                                             INTERPRETED, False)
                else:
                    acc1, l1, m1 = _tile(q1, qs1, k, v_op, k_scale, m1, l1, acc1, valid, QK_FP8, PV_FP8, INTERPRETED,
                                         True)
                    if TWO_TILES:
                        acc2, l2, m2 = _tile(q2, qs2, k, v_op, k_scale, m2, l2, acc2, valid, QK_FP8, PV_FP8,
                                             INTERPRETED, True)

    # an empty list leaves l = 0, acc = 0, m = -inf: l taken as 1 stores output 0 and lse -inf
    _store_tile(acc1, tl.where(l1 > 0, l1, 1.0), m1, O, LSE, V_SCALE, b, h, bh, m0, S_Q, s_ob, s_os, s_oh, s_od,
                HEAD_DIM, ROWS1, PV_FP8, RETURN_LSE)
    if TWO_TILES:
        _store_tile(acc2, tl.where(l2 > 0, l2, 1.0), m2, O, LSE, V_SCALE, b, h, bh, m0 + TILE, S_Q, s_ob, s_os, s_oh,
                    s_od, HEAD_DIM, TILE, PV_FP8, RETURN_LSE)


def fit_config(cfg: KernelConfig, block_size: int) -> KernelConfig:
    """`cfg` with tiles that divide the mask's block; two tiles only where each holds at least 16 rows."""
    block_m, block_n = min(cfg.block_m, block_size), min(cfg.block_n, block_size)
    return replace(cfg, block_m=block_m, block_n=block_n, two_tiles=cfg.two_tiles and block_m >= 32)


def sage_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                          indices: torch.Tensor, block_size: int, pv_fp8: bool, layout: str = "BSND",
                          scale: Optional[float] = None, qk_fp8: bool = False, return_lse: bool = False,
                          config: Optional[KernelConfig] = None):
    """Quantised attention (as `sage_attention`) over the key blocks listed for each query block of
    `block_size` tokens (a power of two >= 32): `counts` int32 [H, Mq], `indices` int32 [H, Mq, W] (H = 1:
    every head alike). q [B, Sq, N, D] ("BSND") or [B, N, Sq, D] ("BNSD"), k, v alike with Sk keys, any
    strides, D in `HEAD_DIMS`. Returns the output in q's layout and dtype (rows of an empty query block: 0),
    with `return_lse` also the natural-log log-sum-exp [B, N, Sq] float32 (-inf for empty rows)."""
    B, H, D, s_q, s_k = _check_qkv(q, k, v, layout, "sage_sparse_attention")
    bs = int(block_size)
    if bs < MIN_BLOCK or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two of at least {MIN_BLOCK} for the quantised kernel, got {bs}")
    mq = math.ceil(s_q / bs)
    if counts.dim() != 2 or counts.shape[1] != mq or indices.dim() != 3 or indices.shape[:2] != counts.shape:
        raise ValueError(f"counts [H, {mq}] and indices [H, {mq}, W] expected for {s_q} queries in blocks of {bs}, "
                         f"got {tuple(counts.shape)} and {tuple(indices.shape)}")
    if counts.shape[0] not in (1, H):
        raise ValueError(f"a per-head layout needs one row list per head ({H}), got {counts.shape[0]}")
    cfg = fit_config(config or default_config(q.device, pv_fp8), bs)
    qq, q_scale, kq, k_scale, vq, v_scale, k_mean, sq_pad, sk_pad, scale = quantize(q, k, v, pv_fp8, layout, scale,
                                                                                    qk_fp8)
    counts = counts.to(device=q.device, dtype=torch.int32)
    indices = indices.to(device=q.device, dtype=torch.int32)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, s_q, dtype=torch.float32, device=q.device) if return_lse else q_scale
    tile = cfg.block_m // 2 if cfg.two_tiles else cfg.block_m
    if cfg.use_tma:
        descs = (_tma_descriptor(qq, [tile, D]), _tma_descriptor(kq, [cfg.block_n, D]),
                 _tma_descriptor(vq, [D, cfg.block_n] if pv_fp8 else [cfg.block_n, D]))
    else:
        descs = (None, None, None)
    shared = counts.shape[0] == 1
    _sparse_kernel[(triton.cdiv(s_q, cfg.block_m), B * H)](
        qq, q_scale, kq, k_scale, vq, v_scale, out, lse, *descs, counts, indices,
        *_strides(out, layout), H, s_q, sq_pad, s_k, sk_pad,
        0 if shared else counts.stride(0), 0 if shared else indices.stride(0), indices.stride(1),
        MASK_BLOCK=bs, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QK_FP8=qk_fp8, PV_FP8=pv_fp8,
        USE_TMA=cfg.use_tma, RETURN_LSE=return_lse, TWO_TILES=cfg.two_tiles, TILE=tile, SCALE_BLOCK=QUANT_BLOCK,
        INTERPRETED=_INTERPRETED, SUBS=bs // cfg.block_n, ROWS1=tile, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not return_lse:
        return out
    # the smoothing removed q·mean(k) from every score of a row: added back (-inf rows stay -inf)
    q_bnsd = q if layout == "BNSD" else q.transpose(1, 2)
    return out, lse + (q_bnsd.float() @ k_mean.reshape(B, H, D, 1)).squeeze(-1) * scale
