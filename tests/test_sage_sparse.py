"""The quantised kernel's block-sparse mode (`sage_sparse_attention`, TRITON_INTERPRET=1 on the CPU, or a GPU) and
its PyTorch reference against dense attention with the same block mask applied, in float64.

Tolerances are tests/test_quantized_attention.py's, for the same reasons (relative L2 of the whole output):
the mask only removes keys from each row's softmax, so the per-score quantisation errors (INT8 Q·K^T ~1% of
the scores, FP8 P and V ~3.6% RMS each) are those of the dense kernel: 3% with 16-bit P·V (SAGE_ATTN_2_8_16),
6% with FP8 P·V (SAGE_ATTN_2_8_8); the kernel against the masked PyTorch reference of the same arithmetic 1% /
3%; the log-sum-exp 0.05 absolute (scores err by ~1% of their spread). Rows whose block attends nothing: 0
and -inf exactly. Inputs carry per-channel offsets in K, which the smoothing (K minus its mean over all keys,
a constant per row whatever keys the row sees) must remove.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from telefuser.ops.quantized_attention import reference_quantized_attention
from telefuser.ops.sparse_attention import layout_from_mask, sparse_attention

from test_block_sparse import dense_masked, random_mask, rel_err

BOUND = {False: 0.03, True: 0.06}  # keyed by pv_fp8
KERNEL_VS_REFERENCE = {False: 0.01, True: 0.03}
LSE_ABS = 0.05
needs_kernel = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(b, s, n, d, dtype=torch.float32, seed=0, packed=True):
    """BSND q, k, v with per-channel offsets in K; `packed`: views of one [B, S, 3, N, D] tensor, as the DiT's."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, s, 3, n, d, generator=gen)
    qkv[:, :, 1] += 4 * torch.randn(d, generator=gen)
    qkv = qkv.to(DEVICE, dtype)
    if packed:
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return tuple(qkv[:, :, i].contiguous() for i in range(3))


def check(out, lse, ref, ref_lse, empty_rows):
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double() - ref_lse)[finite].abs().max().item() < LSE_ABS
    for b, rows, h in empty_rows:
        assert out[b, rows, h].abs().max() == 0


def kernel(q, k, v, mask, bs, pv_fp8, **kwargs):
    from telefuser.kernels.triton.sage_sparse_attention import sage_sparse_attention

    layout = layout_from_mask(mask, bs)
    return sage_sparse_attention(q, k, v, layout.counts, layout.indices, bs, pv_fp8, **kwargs)


@needs_kernel
@pytest.mark.parametrize("pv_fp8", [False, True])
@pytest.mark.parametrize("head_dim,seq,bs", [(64, 301, 64), (128, 200, 128)])
def test_kernel_against_float64_masked(pv_fp8, head_dim, seq, bs):
    """BSND views, batch 2, odd lengths (the last block ragged), a per-head mask with an empty query block."""
    q, k, v = inputs(2, seq, 2, head_dim, seed=head_dim + seq)
    mb = math.ceil(seq / bs)
    mask = random_mask(mb, mb, heads=2, seed=seq)
    mask[0, :, mb - 1] = True  # head 0: every row sees the ragged key block
    mask[1, 1] = False  # head 1: query block 1 computes nothing
    out, lse = kernel(q, k, v, mask, bs, pv_fp8, return_lse=True)
    ref, ref_lse = dense_masked(q, k, v, mask, bs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < BOUND[pv_fp8], rel_err(out, ref)
    check(out, lse, ref, ref_lse, [(b, slice(bs, 2 * bs), 1) for b in range(2)])
    emulated = reference_quantized_attention(*(t.transpose(1, 2) for t in (q, k, v)), pv_fp8, block_mask=mask,
                                             block_size=bs).transpose(1, 2)
    assert rel_err(out, emulated.double()) < KERNEL_VS_REFERENCE[pv_fp8]


@needs_kernel
@pytest.mark.parametrize("pv_fp8", [False, True])
@pytest.mark.parametrize("two_tiles,use_tma", [(True, False), (True, True), (False, True)])
def test_schedules_compute_what_one_tile_does(pv_fp8, two_tiles, use_tma):
    """Two 64-row query tiles per program and/or TMA descriptors (sm90's TUNED shape) against float64, 32-key
    blocks walked in tiles that the config clamps to the block (a 2-row-tile program, 32 keys a tile)."""
    from telefuser.kernels.triton.sage_attention import KernelConfig

    q, k, v = inputs(1, 250, 2, 64, seed=31)
    for bs in (32, 128):
        mb = math.ceil(250 / bs)
        mask = random_mask(mb, mb, seed=bs)
        cfg = KernelConfig(128, 128 if pv_fp8 else 64, 4, 1, use_tma=use_tma, two_tiles=two_tiles)
        out = kernel(q, k, v, mask, bs, pv_fp8, config=cfg)
        ref, _ = dense_masked(q, k, v, mask, bs)
        assert rel_err(out, ref) < BOUND[pv_fp8], (bs, rel_err(out, ref))
        one = kernel(q, k, v, mask, bs, pv_fp8, config=KernelConfig(64, 64, 4, 1))
        assert rel_err(out, one.double()) < KERNEL_VS_REFERENCE[pv_fp8]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_bnsd_and_dense_layout(dtype):
    """bf16 / fp16 in BNSD; the all-true layout equals the dense quantised kernel to its own rounding."""
    from telefuser.kernels.triton.sage_attention import sage_attention

    q, k, v = (t.transpose(1, 2) for t in inputs(1, 190, 2, 128, dtype=dtype, seed=5, packed=False))  # BNSD views
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = kernel(q, k, v, mask, 128, True, layout="BNSD")
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(128), -1) @ v.double()
    assert out.dtype == dtype and rel_err(out, ref) < BOUND[True]
    assert rel_err(out, sage_attention(q, k, v, pv_fp8=True, layout="BNSD").double()) < KERNEL_VS_REFERENCE[True]


@pytest.mark.parametrize("pv_fp8", [False, True])
def test_reference_against_float64_masked(pv_fp8):
    """The masked PyTorch reference (the CPU path of the plans), through `sparse_attention(..., quantized=...)`."""
    q, k, v = inputs(1, 170, 2, 64, seed=17)
    mask = random_mask(6, 6, seed=2)
    mask[3] = False
    variant = "SAGE_ATTN_2_8_8" if pv_fp8 else "SAGE_ATTN_2_8_16"
    out, lse = sparse_attention(q, k, v, block_mask=mask, block_size=32, use_kernel=False, return_lse=True,
                                quantized=variant)
    ref, ref_lse = dense_masked(q, k, v, mask, 32)
    assert rel_err(out, ref) < BOUND[pv_fp8], rel_err(out, ref)
    check(out, lse, ref, ref_lse, [(0, slice(96, 128), h) for h in range(2)])


def test_refuses_small_blocks_and_bad_layouts():
    from telefuser.kernels.triton.sage_sparse_attention import sage_sparse_attention

    q = torch.zeros(1, 64, 1, 64)
    layout = layout_from_mask(torch.ones(4, 4, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="at least 32"):
        sage_sparse_attention(q, q, q, layout.counts, layout.indices, 16, True)
    layout = layout_from_mask(torch.ones(1, 1, dtype=torch.bool), 64)
    with pytest.raises(ValueError, match="counts"):
        sage_sparse_attention(q, q, q, layout.counts, layout.indices, 32, True)
    # the q, k, v checks shared with the dense kernel (sage_attention._check_qkv), named after this entry point
    with pytest.raises(ValueError, match=r"^sage_sparse_attention takes q \[B, Sq, N, D\]"):
        sage_sparse_attention(q, q[:, :, :, :32], q, layout.counts, layout.indices, 64, True)
    with pytest.raises(ValueError, match=r"^sage_sparse_attention supports head dims .*, not 24"):
        sage_sparse_attention(*(torch.zeros(1, 64, 1, 24),) * 3, layout.counts, layout.indices, 64, True)
    with pytest.raises(ValueError, match="layout must be BSND or BNSD"):
        sage_sparse_attention(q, q, q, layout.counts, layout.indices, 64, True, layout="SBND")
