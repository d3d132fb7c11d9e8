"""Block-sparse flash attention: each query block attends only to the key blocks its layout lists.

The layout is built once from a boolean block mask `[Mq, Mk]` (or per head `[N, Mq, Mk]`) at `block_size`
tokens per block (`telefuser.ops.sparse_attention.layout_from_mask`): for each query block, the number of
key blocks it computes (`counts [H, Mq]`) and their indices (`indices [H, Mq, max_count]`, ascending,
padded with 0), CSR-like with rows padded to the longest one. One program handles `BLOCK_M` query rows
of one (batch, head) and walks only its row's listed key blocks: a skipped block costs nothing but not
being in the list, so the time scales with the computed blocks.

- q, k, v are [B, S, N, D] (BSND) read through their strides: no copies, no transposes; D in 16..256, a
  power of two (Wan: 64 / 128).
- Any sequence length: the ragged end is masked only in the last key tile (an `if` on the tile's position);
  full tiles load and score without masks. Query rows past the end are masked on load and store.
- Online softmax (exp2, the scale folded with log2(e)), statistics and accumulator in float32; inputs
  fp32 / bf16 / fp16; the output has the input dtype. For fp32 inputs the dots run in IEEE fp32
  (`input_precision="ieee"`: no TF32), so they equal dense attention up to float32 rounding.
- Optionally returns the log-sum-exp (natural log, [B, N, Sq] float32): for merging partial results (ring
  attention, a text segment attended apart). A query block whose list is empty gets output 0 and lse -inf.

The layout (`BlockLayout`, `layout_from_mask`) and the PyTorch reference with the same semantics (for the
CPU) live in `telefuser.ops.sparse_attention`, which dispatches between the two.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _heuristic_tiles(block_size: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) dividing the mask's block: 128 x 64 (64-dim heads) or 64 x 64 (128-dim heads)."""
    return min(block_size, 128 if head_dim <= 64 else 64), min(block_size, 64)


def _candidate_configs() -> list[triton.Config]:
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=w, num_stages=st)
               for m in (64, 128) for w in (4, 8) for st in (2, 3)]
    configs += [triton.Config({"BLOCK_M": b, "BLOCK_N": b}, num_warps=4, num_stages=2) for b in (16, 32)]
    return configs


def _prune(configs, named_args, **kwargs):
    """Tiles must divide the mask's block; small blocks get one tile per block. Under the interpreter only the
    heuristic tiles run (autotuning there would only multiply the tests' time)."""
    args = {**named_args, **kwargs}
    bs, d = int(args["MASK_BLOCK"]), int(args["HEAD_DIM"])
    smallest = min(bs, 64)
    kept = [c for c in configs if bs % c.kwargs["BLOCK_M"] == 0 and bs % c.kwargs["BLOCK_N"] == 0
            and c.kwargs["BLOCK_M"] >= smallest and c.kwargs["BLOCK_N"] >= smallest]
    if os.environ.get("TRITON_INTERPRET") == "1":
        m, n = _heuristic_tiles(bs, d)
        kept = [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (m, n)][:1]
    return kept


@triton.autotune(configs=_candidate_configs(), key=["HEAD_DIM", "MASK_BLOCK", "IEEE", "RETURN_LSE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _block_sparse_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, counts_ptr, indices_ptr,
    Sq, Sk, N, scale_log2,
    q_sb, q_ss, q_sn, k_sb, k_ss, k_sn, v_sb, v_ss, v_sn, o_sb, o_ss, o_sn,
    cnt_sh, idx_sh, idx_sm,
    MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr, RETURN_LSE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // N).to(tl.int64)
    h = (pid_bh % N).to(tl.int64)
    row_block = (pid_m * BLOCK_M) // MASK_BLOCK

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = offs_m < Sq
    q = tl.load(q_ptr + b * q_sb + h * q_sn + offs_m[:, None].to(tl.int64) * q_ss + offs_d[None, :],
                mask=q_rows[:, None], other=0.0)
    if UPCAST:  # see _interpreter_upcast
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # The layout is shared by every head (stride 0 over heads) or one per head.
    count = tl.load(counts_ptr + h * cnt_sh + row_block)
    row_indices = indices_ptr + h * idx_sh + row_block * idx_sm
    k_base = k_ptr + b * k_sb + h * k_sn
    v_base = v_ptr + b * v_sb + h * v_sn
    for i in range(0, count):
        key_block = tl.load(row_indices + i)
        for sub in range(0, MASK_BLOCK // BLOCK_N):
            start_n = key_block * MASK_BLOCK + sub * BLOCK_N
            if start_n < Sk:  # a sub-tile wholly past the end of a ragged last block is skipped
                cols = start_n + offs_n
                k_offs = cols[None, :].to(tl.int64) * k_ss + offs_d[:, None]  # K^T tile [D, BLOCK_N]
                v_offs = cols[:, None].to(tl.int64) * v_ss + offs_d[None, :]
                if start_n + BLOCK_N <= Sk:  # a full tile: no masks
                    kt = tl.load(k_base + k_offs)
                    vt = tl.load(v_base + v_offs)
                    if UPCAST:
                        kt = kt.to(tl.float32)
                    if IEEE:
                        s = tl.dot(q, kt, input_precision="ieee")
                    else:
                        s = tl.dot(q, kt)
                    s = s * scale_log2
                else:  # the ragged end of the keys: only in the last key block
                    valid = cols < Sk
                    kt = tl.load(k_base + k_offs, mask=valid[None, :], other=0.0)
                    vt = tl.load(v_base + v_offs, mask=valid[:, None], other=0.0)
                    if UPCAST:
                        kt = kt.to(tl.float32)
                    if IEEE:
                        s = tl.dot(q, kt, input_precision="ieee")
                    else:
                        s = tl.dot(q, kt)
                    s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # m_new is finite: every tile that gets here holds at least one valid key (start_n < Sk)
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                pv = p.to(vt.dtype)  # P rounded to the input dtype for the second dot, as flash kernels do
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(pv, vt, input_precision="ieee")
                elif UPCAST:
                    acc = acc * alpha[:, None] + tl.dot(pv.to(tl.float32), vt.to(tl.float32))
                else:
                    acc = acc * alpha[:, None] + tl.dot(pv, vt)
                m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    tl.store(o_ptr + b * o_sb + h * o_sn + offs_m[:, None].to(tl.int64) * o_ss + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_rows[:, None])
    if RETURN_LSE:
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(safe_l)) / 1.4426950408889634, float("-inf"))
        tl.store(lse_ptr + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=q_rows)


def _interpreter_upcast(dtype: torch.dtype) -> bool:
    """Triton 3.x's interpreter (TRITON_INTERPRET=1) computes `tl.dot` of two bfloat16 tiles wrongly (1e10 off
    for unit inputs; float16 and float32 are right). There the bf16 tiles go to the dot as float32: the same
    values (the products of bf16 numbers are exact in float32, and the GPU's dot accumulates in float32)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                           indices: torch.Tensor, block_size: int, scale: Optional[float] = None,
                           return_lse: bool = False):
    """softmax(q k^T * scale) v over the key blocks listed for each query block; q [B, Sq, N, D], k, v
    [B, Sk, N, D] (BSND, any strides with a contiguous head dim); `counts` int32 [H, Mq] and `indices` int32
    [H, Mq, W] (H = 1: every head alike; see `telefuser.ops.sparse_attention.layout_from_mask`), blocks of
    `block_size` tokens. Returns out [B, Sq, N, D] in q's dtype (contiguous), and with `return_lse` also
    lse [B, N, Sq] float32 (natural log)."""
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
    counts = counts.to(device=q.device, dtype=torch.int32)
    indices = indices.to(device=q.device, dtype=torch.int32)
    out = torch.empty(b, sq, n, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, n, sq, device=q.device, dtype=torch.float32) if return_lse else out  # unused when False
    scale = d ** -0.5 if scale is None else scale
    shared = counts.shape[0] == 1
    def grid(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * n)

    _block_sparse_attn_kernel[grid](
        q, k, v, out, lse, counts, indices, sq, sk, n, float(scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        0 if shared else counts.stride(0), 0 if shared else indices.stride(0), indices.stride(1),
        MASK_BLOCK=bs, HEAD_DIM=d,
        IEEE=q.dtype == torch.float32, RETURN_LSE=return_lse, UPCAST=_interpreter_upcast(q.dtype),
    )
    return (out, lse) if return_lse else out
