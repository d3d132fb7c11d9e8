"""The block-sparse attention kernel (TRITON_INTERPRET=1 on the CPU, or a GPU) against dense attention with the
same mask applied, computed independently here in float64.

Tolerances, against the float64 reference (relative Frobenius error over the whole output):
- float32 inputs: the kernel's dots are IEEE fp32 and its softmax statistics fp32, so the error is float32
  rounding accumulated over a few hundred terms, ~1e-6; 2e-5 allowed (the project's fp32 kernel bound).
- bf16 / fp16 inputs: q, k, v are exact in the reference (it upcasts the same rounded inputs); the kernel
  rounds P to the input dtype before the P V dot (as every flash kernel does: 2^-8 relative for bf16, 2^-11
  for fp16 per probability) and the output once at the end (the same again). Two roundings of relative
  error u each give ~2u in the worst case and ~u/sqrt(keys) after averaging; we allow 2u:
  8e-3 (bf16), 1e-3 (fp16). Measured under the interpreter: 2.9e-7 (fp32), 5.0e-3 (bf16), 2.6e-4 (fp16).
- the log-sum-exp comes from fp32 dots of the same rounded inputs in every dtype: 1e-5 absolute.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from telefuser.ops.sparse_attention import (BlockLayout, block_sparse_attention_reference,
                                             layout_from_mask)

TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def dense_masked(q, k, v, block_mask, bs, scale=None):
    """float64 dense attention with the block mask expanded to tokens; rows attending nothing give 0."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, N, S, D]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = block_mask if block_mask.dim() == 3 else block_mask[None]
    tokens = mask.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, : q.shape[2], : k.shape[2]].to(q.device)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~tokens[None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return (p @ v).transpose(1, 2), lse


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def random_mask(mq, mk, heads=None, seed=0, empty_row=None):
    g = torch.Generator().manual_seed(seed)
    shape = (mq, mk) if heads is None else (heads, mq, mk)
    mask = torch.rand(shape, generator=g) < 0.45
    mask[..., torch.arange(min(mq, mk)), torch.arange(min(mq, mk))] = True  # a diagonal, as real patterns have
    if empty_row is not None:
        mask[..., empty_row, :] = False
    return mask


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def test_layout_lists_each_row_ascending():
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, False, False]])
    layout = layout_from_mask(mask, 16)
    assert layout.shape == (3, 4) and layout.counts.tolist() == [[3, 0, 1]]
    assert layout.indices.tolist() == [[[0, 2, 3], [0, 0, 0], [1, 0, 0]]]
    assert layout.indices.dtype == torch.int32


@pytest.mark.parametrize("seq", [64, 50])  # a whole number of blocks, and a ragged end
def test_reference_matches_dense_masked(seq):
    bs = 16
    mq = math.ceil(seq / bs)
    mask = random_mask(mq, mq, empty_row=1)
    q, k, v = (rand(1, seq, 2, 32, seed=i) for i in range(3))
    out, lse = block_sparse_attention_reference(q, k, v, layout_from_mask(mask, bs), return_lse=True)
    ref, ref_lse = dense_masked(q, k, v, mask, bs)
    assert rel_err(out, ref) < 1e-6
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-5
    assert out[:, bs: 2 * bs].abs().max() == 0  # the empty query block


def block_sparse_attention(q, k, v, layout, **kwargs):
    """The Triton kernel itself (not the ops dispatch) on a layout."""
    from telefuser.kernels.triton.block_sparse_attention import block_sparse_attention as kernel

    return kernel(q, k, v, layout.counts, layout.indices, layout.block_size, **kwargs)


needs_triton = pytest.mark.skipif(not TRITON, reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_dense_masked(dtype):
    bs, seq = 32, 80  # 3 blocks, the last one ragged (16 of 32 tokens)
    mask = random_mask(3, 3, seed=1)
    mask[2, 0] = mask[0, 2] = True  # a full key block after the ragged one's row, and the ragged key block
    q, k, v = (rand(2, seq, 2, 64, dtype=dtype, seed=i) for i in range(3))
    out, lse = block_sparse_attention(q, k, v, layout_from_mask(mask, bs), return_lse=True)
    ref, ref_lse = dense_masked(q, k, v, mask, bs)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    assert (lse.double() - ref_lse).abs().max() < 1e-5  # the scores are fp32 dots of the same rounded inputs


@needs_triton
def test_kernel_strided_inputs_per_head_layout_empty_rows_and_scale():
    """BSND views of a packed qkv tensor (no copies), head dim 128, a mask per head with an empty query block."""
    bs, seq, heads = 16, 40, 2
    qkv = rand(1, seq, 3, heads, 128, seed=5)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # strided: token stride 3 * heads * 128
    assert not q.is_contiguous()
    mask = random_mask(3, 3, heads=heads, seed=2)
    mask[1, 2] = False  # head 1's last query block computes nothing
    out, lse = block_sparse_attention(q, k, v, layout_from_mask(mask, bs), scale=0.05, return_lse=True)
    ref, ref_lse = dense_masked(q, k, v, mask, bs, scale=0.05)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert out[0, 32:, 1].abs().max() == 0 and torch.isinf(lse[0, 1, 32:]).all()
    ref_out, ref_lse2 = block_sparse_attention_reference(q, k, v, layout_from_mask(mask, bs), scale=0.05, return_lse=True)
    assert rel_err(out, ref_out.double()) < TOL[torch.float32]


@needs_triton
def test_kernel_dense_layout_equals_sdpa():
    q, k, v = (rand(1, 48, 2, 64, seed=i) for i in range(3))
    out = block_sparse_attention(q, k, v, layout_from_mask(torch.ones(3, 3, dtype=torch.bool), 16))
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)))
    assert rel_err(out, ref.transpose(1, 2)) < TOL[torch.float32]


def test_layout_checks_shapes():
    layout = layout_from_mask(torch.ones(2, 2, dtype=torch.bool), 16)
    q = torch.zeros(1, 40, 1, 32)  # 3 blocks of 16, the layout has 2
    with pytest.raises(ValueError, match="need"):
        block_sparse_attention_reference(q, q, q, layout)
    assert isinstance(layout, BlockLayout)


@needs_triton
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.bfloat16, 128)])
def test_kernel_default_block_size_sub_tiles(dtype, head_dim):
    """block_size 128 (the default): key blocks walked in 64-key sub-tiles; 150 tokens leave a last block of 22
    keys, so its second sub-tile lies wholly past the end (skipped) and its first is ragged (masked)."""
    bs, seq = 128, 150
    mask = torch.tensor([[True, False], [True, True]])
    q, k, v = (rand(1, seq, 1, head_dim, dtype=dtype, seed=i) for i in range(3))
    out = block_sparse_attention(q, k, v, layout_from_mask(mask, bs))
    ref, _ = dense_masked(q, k, v, mask, bs)
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    lone = layout_from_mask(torch.tensor([[False, True], [False, True]]), bs)  # only the ragged block
    out = block_sparse_attention(q, k, v, lone)
    ref, _ = dense_masked(q, k, v, torch.tensor([[False, True], [False, True]]), bs)
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


# ------------------------------------------------------------------ the schedules (tiles, TMA, two query tiles)

SCHEDULES = {  # what TUNED / default_config pick on the GPU and the CPU, and the mixes in between
    "one tile, pointers": dict(block_m=64, block_n=64),
    "one tile, TMA": dict(block_m=64, block_n=64, use_tma=True),
    "two tiles, pointers": dict(block_m=128, block_n=64, two_tiles=True),
    "two tiles, TMA, 128 keys": dict(block_m=128, block_n=128, use_tma=True, two_tiles=True),
}


@needs_triton
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_schedules_match_dense_masked(schedule, dtype, head_dim):
    """Every schedule over BSND views of a packed qkv tensor (what the DiT passes; the TMA descriptors' [B*S, N*D]
    matrix), batch 2 (TMA tiles at a ragged end would read the next batch's rows: they must be masked), 301
    tokens in blocks of 128 (the last block 45 keys), a per-head mask with an empty query block."""
    from telefuser.kernels.triton.block_sparse_attention import KernelConfig, _tma_view_ok

    bs, seq, heads = 128, 301, 2
    qkv = rand(2, seq, 3, heads, head_dim, dtype=dtype, seed=21)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert all(_tma_view_ok(t) for t in (q, k, v))
    mask = random_mask(3, 3, heads=heads, seed=4)
    mask[0, 2] = True  # head 0: the ragged key block in every row
    mask[1, 1] = False  # head 1: query block 1 computes nothing
    cfg = KernelConfig(num_stages=1, **SCHEDULES[schedule])
    out, lse = block_sparse_attention(q, k, v, layout_from_mask(mask, bs), return_lse=True, config=cfg)
    ref, ref_lse = dense_masked(q, k, v, mask, bs)
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse.double() - ref_lse)[finite].abs().max() < 1e-5
    assert out[:, 128:256, 1].abs().max() == 0


@needs_triton
def test_tma_falls_back_for_strides_it_cannot_read_and_cross_lengths():
    """A BSND view of a BNSD tensor (heads not packed in a token) takes pointer loads under a TMA config; queries and
    keys of different lengths (160 and 230: a [2, 2] mask of 128-blocks, both ragged)."""
    from telefuser.kernels.triton.block_sparse_attention import KernelConfig, _tma_view_ok

    q = rand(1, 2, 160, 64, dtype=torch.bfloat16, seed=7).transpose(1, 2)
    k, v = (rand(1, 2, 230, 64, dtype=torch.bfloat16, seed=s).transpose(1, 2) for s in (8, 9))
    assert not _tma_view_ok(q)
    mask = torch.tensor([[True, True], [False, True]])
    cfg = KernelConfig(block_m=128, block_n=64, num_stages=1, use_tma=True, two_tiles=True)
    out = block_sparse_attention(q, k, v, layout_from_mask(mask, 128), config=cfg)
    ref, _ = dense_masked(q, k, v, mask, 128)
    assert rel_err(out, ref) < TOL[torch.bfloat16], rel_err(out, ref)


def test_fit_config_divides_the_mask_block():
    from telefuser.kernels.triton.block_sparse_attention import TUNED, KernelConfig, fit_config

    tuned = TUNED[((9, 0), 128)]
    assert fit_config(tuned, 128, torch.bfloat16) == tuned
    small = fit_config(tuned, 16, torch.bfloat16)  # one 16 x 16 tile per block, no second tile
    assert (small.block_m, small.block_n, small.two_tiles) == (16, 16, False)
    assert not fit_config(KernelConfig(use_tma=True), 128, torch.float32).use_tma  # fp32: IEEE dots, pointers
    with pytest.raises(ValueError, match="scale must be positive"):
        block_sparse_attention(*(torch.zeros(1, 16, 1, 16) for _ in range(3)),
                               layout_from_mask(torch.ones(1, 1, dtype=torch.bool), 16), scale=-1.0)
