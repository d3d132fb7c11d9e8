"""Quantised attention (SAGE_ATTN_*): the Triton kernel and its PyTorch reference against float64 attention.

Error bounds, relative L2 of the output against float64 softmax attention on fresh N(0, 1) inputs:
- INT8 Q·K^T (per-token Q scale, per-128-key K scale after smoothing): a step of amax/127 per element,
  ~0.7% RMS of each q and k element for Gaussian rows, ~1% on the scores; the output error measured 1.0-1.3%.
  Bound for SAGE_ATTN_2_8_16 (P in bf16: +0.2%): 3%, the issue's target.
- FP8 e4m3 P and V (3 mantissa bits: rounding error uniform in +-2^-4 relative, 3.6% RMS each, independent):
  sqrt(2) * 3.6% = 5.1% expected from P and V together, ~3.5% measured (P's error averages over many keys).
  Bound for SAGE_ATTN_2_8_8: 6%, the issue's target.
The kernel against the reference (same arithmetic; the kernel's running row maximum against the reference's
final one changes only which P values round where): 1% (8_16) and 3% (8_8).
Inputs with an outlier offset in K's channels check the smoothing: without it the 8-bit range would go to
the offset and the error would grow several-fold.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from telefuser.ops.attention import attention
from telefuser.ops.quantized_attention import VARIANTS, reference_quantized_attention

BOUND = {False: 0.03, True: 0.06}  # keyed by pv_fp8
KERNEL_VS_REFERENCE = {False: 0.01, True: 0.03}
needs_kernel = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def exact(q, k, v, layout="BSND"):
    """float64 softmax attention and its log-sum-exp ([B, N, Sq])."""
    if layout == "BSND":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    out = torch.softmax(s, dim=-1) @ v.double()
    return (out.transpose(1, 2) if layout == "BSND" else out), torch.logsumexp(s, dim=-1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(b, sq, sk, n, d, layout="BSND", dtype=torch.float32, outliers=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (lambda s: (b, s, n, d)) if layout == "BSND" else (lambda s: (b, n, s, d))
    q, k, v = (torch.randn(shape(s), generator=gen) for s in (sq, sk, sk))
    if outliers:
        k = k + 4 * torch.randn(d, generator=gen)  # per-channel offsets: what smoothing removes
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


@needs_kernel
@pytest.mark.parametrize("pv_fp8", [False, True])
@pytest.mark.parametrize("layout", ["BSND", "BNSD"])
@pytest.mark.parametrize("shape", [(2, 200, 200, 2, 64), (1, 130, 77, 3, 32), (1, 64, 300, 1, 128)])
def test_kernel_against_float64(pv_fp8, layout, shape):
    from telefuser.kernels.triton.sage_attention import sage_attention

    q, k, v = inputs(*shape, layout=layout)
    out, lse = sage_attention(q, k, v, pv_fp8=pv_fp8, layout=layout, return_lse=True)
    ref, ref_lse = exact(q, k, v, layout)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert rel(out, ref) < BOUND[pv_fp8]
    # the log-sum-exp, smoothing correction included: scores err by ~1% of their spread, so 0.05 absolute
    assert (lse.double() - ref_lse).abs().max().item() < 0.05
    emulated = reference_quantized_attention(*(t if layout == "BNSD" else t.transpose(1, 2) for t in (q, k, v)),
                                             pv_fp8)
    emulated = emulated if layout == "BNSD" else emulated.transpose(1, 2)
    assert rel(out, emulated) < KERNEL_VS_REFERENCE[pv_fp8]


@needs_kernel
@pytest.mark.parametrize("pv_fp8", [False, True])
def test_two_query_tiles_per_program(pv_fp8):
    """The schedule with two independent query tiles per program computes what one tile does."""
    from telefuser.kernels.triton.sage_attention import KernelConfig, sage_attention

    q, k, v = inputs(1, 300, 300, 2, 64, seed=13)
    one = sage_attention(q, k, v, pv_fp8=pv_fp8, config=KernelConfig(128, 64, 4, 1))
    two = sage_attention(q, k, v, pv_fp8=pv_fp8, config=KernelConfig(128, 64, 4, 1, two_tiles=True))
    assert rel(two, exact(q, k, v)[0]) < BOUND[pv_fp8]
    assert rel(two, one) < KERNEL_VS_REFERENCE[pv_fp8]  # the tiles' rows see the same blocks in the same order


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_inputs_and_strided_views(dtype):
    """bf16/fp16 inputs read through strides (a BSND view of a BNSD tensor): nothing is copied first."""
    from telefuser.kernels.triton.sage_attention import sage_attention

    q, k, v = inputs(2, 150, 150, 2, 64, layout="BNSD", dtype=dtype, seed=3)
    views = [t.transpose(1, 2) for t in (q, k, v)]  # BSND, non-contiguous
    out = sage_attention(*views, pv_fp8=True, layout="BSND")
    ref, _ = exact(*views)
    assert out.dtype == dtype and rel(out, ref) < BOUND[True]


@needs_kernel
def test_smoothing_matters_for_outliers():
    """K with large per-channel offsets: the error stays at the no-offset level (smoothing removes them)."""
    from telefuser.kernels.triton.sage_attention import sage_attention

    q, k, v = inputs(1, 128, 128, 2, 64, outliers=False, seed=5)
    plain = rel(sage_attention(q, k, v, pv_fp8=False), exact(q, k, v)[0])
    shifted = k + 30 * torch.randn(64, generator=torch.Generator().manual_seed(6)).to(k)
    with_offset = rel(sage_attention(q, shifted, v, pv_fp8=False), exact(q, shifted, v)[0])
    assert with_offset < 2 * plain + 1e-3


@pytest.mark.parametrize("pv_fp8", [False, True])
def test_reference_against_float64(pv_fp8):
    q, k, v = inputs(2, 257, 257, 2, 64, layout="BNSD", seed=7)
    ref, _ = exact(q, k, v, "BNSD")
    assert rel(reference_quantized_attention(q, k, v, pv_fp8), ref) < BOUND[pv_fp8]


@pytest.mark.parametrize("impl", list(VARIANTS))
def test_ops_attention_runs_each_variant(impl):
    """`telefuser.ops.attention.attention(..., attn_impl)` on CPU tensors: the kernel under the interpreter,
    the reference otherwise; cross-attention over a short key sequence is exact."""
    q, k, v = inputs(1, 96, 96, 2, 32, seed=9)
    out = attention(q, k, v, impl)
    assert rel(out, exact(q, k, v)[0]) < BOUND[VARIANTS[impl].pv_fp8]
    text_k, text_v = k[:, :40], v[:, :40]
    assert torch.allclose(attention(q, text_k, text_v, impl), attention(q, text_k, text_v, "TORCH_SDPA"))


def test_ops_attention_refuses_unsupported_head_dim():
    q = torch.randn(1, 8, 2, 48)
    with pytest.raises(ValueError, match="SAGE_ATTN_2_8_8 cannot run here: supports head dims"):
        attention(q, q, q, "SAGE_ATTN_2_8_8")


def test_kernel_refuses_bad_shapes():
    from telefuser.kernels.triton.sage_attention import sage_attention

    q = torch.randn(1, 8, 2, 64)
    with pytest.raises(ValueError, match="head dims"):
        sage_attention(q[..., :48], q[..., :48], q[..., :48], pv_fp8=True)
    with pytest.raises(ValueError, match="takes q"):
        sage_attention(q, q[:, :, :1], q, pv_fp8=True)


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    """The tiny Wan2.1 plan with exact attention and with each quantised variant in its DiT (same seed)."""
    from pathlib import Path

    import telefuser
    from telefuser.compiler import compile_recipe
    from telefuser.schema.canonical import pretty_json

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"
    folder = tmp_path_factory.mktemp("tiny_sage")
    videos = {}
    for impl in ("TORCH_SDPA", *VARIANTS):  # 2 steps: the interpreted kernel costs ~2.4 s per tiny CFG step
        plan = compile_recipe(recipe, [f"layer2.models.dit.attention_config.attn_impl={impl}",
                                       "layer2.num_inference_steps=2"])
        assert dict(plan.dispatch_table("dit"))["attention"] == impl
        path = folder / f"{impl}.plan.json"
        path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
        videos[impl] = telefuser.load_plan(str(path)).run(prompt="a red fox", seed=3, progress=False).frames
    return videos


@pytest.mark.parametrize("impl", list(VARIANTS))
def test_tiny_plan_runs_end_to_end_with_each_variant(tiny_videos, impl):
    """The whole plan (text encoder, 2 CFG steps, VAE) with the DiT's attention quantised: same frames shape,
    close to the exact video: PSNR against the exact one measured 56.6 dB (8_8) and 60.0 dB (8_16) under the
    interpreter (the tiny DiT's 2 layers compound little); 35 dB leaves room for the CPU reference path and
    still fails a kernel that is wrong anywhere that matters."""
    import numpy as np

    exact_frames = np.asarray(tiny_videos["TORCH_SDPA"], dtype=np.float64)
    frames = np.asarray(tiny_videos[impl], dtype=np.float64)
    assert frames.shape == exact_frames.shape
    mse = ((frames - exact_frames) ** 2).mean()
    assert 10 * math.log10(255.0**2 / max(mse, 1e-12)) > 35


@pytest.mark.parametrize("pv_fp8", [False, True])
def test_reference_lse(pv_fp8):
    q, k, v = inputs(1, 100, 90, 2, 64, layout="BNSD", seed=11)
    _, lse = reference_quantized_attention(q, k, v, pv_fp8, return_lse=True)
    assert (lse.double() - exact(q, k, v, "BNSD")[1]).abs().max().item() < 0.05
