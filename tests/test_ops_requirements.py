"""Declared requirements (schema/backends.py) as ops enforces them: kernels fall back, attention refuses clearly."""

from __future__ import annotations

import pytest
import torch

from telefuser.ops import dispatch
from telefuser.ops.attention import _RUNNERS, _backend_package, attention
from telefuser.ops.normalization import rms_norm
from telefuser.schema.backends import ATTENTION_BACKENDS, KERNELS


def test_requirements_cover_every_runner_and_compiler_op():
    from telefuser.compiler.dispatch import KERNEL_OPS

    assert set(KERNELS) == set(KERNEL_OPS)  # the compiler records an impl for exactly the ops that have kernels
    dense = {name for name, spec in ATTENTION_BACKENDS.items() if spec.dense}
    built_sparse = {"RADIAL_ATTN", "LOCAL_SPARSE_ATTN", "SSTA_ATTN"}  # our block-sparse kernel (the others: none yet)
    assert dense | built_sparse == set(_RUNNERS)  # every backend the compiler may plan has a runner


def test_kernel_skipped_where_its_requirements_fail(monkeypatch):
    import telefuser.kernels.triton.norms as norms

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so only the declared dtype/width rules decide
    monkeypatch.setattr(norms, "rms_norm", lambda *a: pytest.fail("kernel ran outside its declared requirements"))
    with dispatch.use_dispatch({"rms_norm": "triton"}):
        x = torch.randn(2, 8, dtype=torch.float64)  # float64 is not a kernel dtype
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        assert torch.allclose(rms_norm(x, None, 1e-6), ref, rtol=1e-6)  # the native path's fp32 statistics
        wide = torch.randn(1, KERNELS["rms_norm"].max_width + 1)  # a row too long for registers
        assert rms_norm(wide, None, 1e-6).shape == wide.shape


def test_attention_refuses_clearly():
    q = torch.randn(1, 4, 2, 64)
    # A backend that is not installed is named before anything else about it; an installed one is checked
    # against the tensors (here: CPU tensors for a CUDA-only kernel).
    import importlib.util

    if importlib.util.find_spec("flash_attn_interface") is None:
        with pytest.raises(RuntimeError, match="FLASH_ATTN_3 needs the package 'flash_attn_interface'"):
            attention(q, q, q, "FLASH_ATTN_3")
    else:
        with pytest.raises(ValueError, match="FLASH_ATTN_3 cannot run here: runs on cuda, the tensors are on cpu"):
            attention(q, q, q, "FLASH_ATTN_3")
    with pytest.raises(ValueError, match="no runner"):
        attention(q, q, q, "SPARGE_ATTN")
    # TORCH_CUDNN on CPU tensors is plain SDPA (cuDNN is only a preference among SDPA's CUDA kernels).
    assert torch.allclose(attention(q, q, q, "TORCH_CUDNN"), attention(q, q, q, "TORCH_SDPA"))


@pytest.mark.parametrize("name", ["FLASH_ATTN_2", "FLASH_ATTN_3", "FLASH_ATTN_4"])
def test_missing_package_named(name):
    try:
        __import__(ATTENTION_BACKENDS[name].package)
        pytest.skip(f"{ATTENTION_BACKENDS[name].package} is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match=f"needs the package '{ATTENTION_BACKENDS[name].package}'"):
        _backend_package(name)
