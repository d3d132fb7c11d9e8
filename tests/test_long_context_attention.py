"""long_context_attention over real gloo process groups on the CPU, against one-process float64 attention.

Tolerance: inputs are float32 standard normals with D = 16 and the default scale 1/4, so scores are O(1), the
softmax weights lie in [0, 1] and the outputs are weighted averages of O(1) values (|out| < 5 here). Float32
rounding (eps 1.2e-7) through the score dot products, exp, the sums over at most 32 keys and the float32 LSE
merge of at most 4 blocks leaves errors of a few 1e-7 against the float64 reference (measured: at most 7.5e-7
for the outputs, 4.2e-7 for the LSE); atol 2e-5 with rtol 1e-4 keeps a margin of more than 25x, while a dropped,
duplicated or misplaced key block, or a leaked padded key (the padding holds 10x larger values), moves outputs
by 1e-2 or more.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from gloo_ranks import spawn
from telefuser.ops.long_context import (_cuda_kernel, _math_attention_with_lse, attention_with_lse, ulysses_groups,
                                        long_context_attention)

ATOL, RTOL = 2e-5, 1e-4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 softmax attention over BSND tensors: (out [B, S, N, D], lse [B, N, S])."""
    scores = torch.einsum("bsnd,btnd->bnst", q.double(), k.double()) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("bnst,btnd->bsnd", scores.softmax(dim=-1), v.double()), lse


# ---------------------------------------------------------------------------------------------------------------
# Single process: the local attention that the ring merges.


@pytest.mark.parametrize("fn", [attention_with_lse, _math_attention_with_lse], ids=["dispatch", "math"])
@pytest.mark.parametrize("scale", [0.25, 0.37])
def test_attention_with_lse_matches_float64(fn: Callable, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g) for n in (11, 7, 7))  # S_q != S_k, as for ring blocks
    out, lse = fn(q, k, v, scale)
    ref_out, ref_lse = reference(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 3, 11) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, head_dim, kernel, atol", [
    (torch.float16, 64, "cudnn" if HOPPER else "flash", 2e-3),  # output rounded to fp16 (eps 1e-3) at |out| < 2
    (torch.bfloat16, 128, "cudnn" if HOPPER else "flash", 1.6e-2),  # bf16 eps 7.8e-3
    (torch.bfloat16, 256, "flash", 1.6e-2),  # beyond cuDNN's head dims
    (torch.float32, 64, "efficient", ATOL),
    (torch.float32, 12, "efficient", ATOL),
    (torch.float16, 20, "math", 2e-3),  # head dim not 16-byte aligned: no fused kernel takes it
    (torch.float64, 64, "math", ATOL),
])
def test_attention_with_lse_cuda_kernels(dtype: torch.dtype, head_dim: int, kernel: str, atol: float) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    # 100 queries: not a multiple of 32, where the efficient kernel pads its LSE.
    q, k, v = (torch.randn(2, n, 4, head_dim, device="cuda", generator=g).to(dtype) for n in (100, 77, 77))
    assert _cuda_kernel(q) == kernel
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = reference(q, k, v, head_dim ** -0.5)  # from the same rounded inputs
    assert out.dtype == dtype and lse.shape == (2, 4, 100) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)  # the kernels accumulate in float32


def test_attention_with_lse_refuses_empty_keys() -> None:
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="at least one key"):
        attention_with_lse(q, q[:, :0], q[:, :0])


# ---------------------------------------------------------------------------------------------------------------
# Multi-process: each case is (mesh_dim_names, mesh_shape, batch, seq_len, padded_len, heads, head_dim,
# attention_config). padded_len > seq_len exercises the padding; padded_len == seq_len passes seq_len=None.

CASES_2 = [
    (("sp_ulysses",), (2,), 2, 16, 16, 4, 16, None),
    (("sp_ulysses",), (2,), 1, 15, 16, 2, 16, "TORCH_SDPA"),  # backend name passed through
    (("sp_ulysses",), (2,), 1, 15, 16, 8, 16, None),  # 4 heads per rank: the exchange pipelined in 4 groups
    (("sp_ulysses",), (2,), 2, 16, 16, 6, 16, None),  # 3 per rank: 3 groups
    (("sp_ring",), (2,), 2, 16, 16, 3, 16, None),
    (("sp_ring",), (2,), 1, 13, 14, 2, 16, None),  # the second block holds 6 valid keys of 7
    (("dp", "sp_ring"), (1, 2), 1, 9, 10, 2, 16, None),
    (("cfg",), (2,), 1, 9, 12, 2, 16, None),  # no sequence parallelism: local attention, padded keys dropped
]

CASES_4 = [
    (("sp_ulysses",), (4,), 1, 32, 32, 4, 16, None),
    (("sp_ulysses",), (4,), 2, 30, 32, 8, 16, None),
    (("sp_ring",), (4,), 1, 32, 32, 2, 16, None),
    (("sp_ring",), (4,), 2, 5, 8, 2, 16, None),  # blocks hold 2, 2, 1, 0 valid keys (the last one is skipped)
    (("sp_ring", "sp_ulysses"), (2, 2), 1, 24, 24, 4, 16, None),  # USP
    (("sp_ring", "sp_ulysses"), (2, 2), 2, 21, 24, 2, 16, None),  # USP: ring blocks hold 12 and 9 valid keys
    (("sp_ulysses", "sp_ring"), (2, 2), 1, 15, 16, 2, 16, None),  # USP, dims listed the other way round
    (("cfg", "sp_ulysses"), (2, 2), 1, 13, 14, 2, 16, None),  # groups must come from the sp dim, not cfg
    (("cfg", "sp_ring"), (2, 2), 1, 14, 14, 2, 16, None),
]

SP_DIMS = ("sp_ulysses", "sp_ring")


def _run_case(names: tuple[str, ...], shape: tuple[int, ...], batch: int, seq_len: int, padded_len: int, heads: int,
              head_dim: int, attention_config: Optional[str]) -> None:
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    coord = {name: mesh.get_local_rank(name) for name in names}
    size = dict(zip(names, shape))
    ulysses, ring = size.get("sp_ulysses", 1), size.get("sp_ring", 1)
    sp = ulysses * ring
    local = padded_len // sp
    # Inputs differ along the non-sequence dims, so taking a group from the wrong dim mixes unrelated problems.
    other = sum(c * 100 ** i for i, (name, c) in enumerate(coord.items()) if name not in SP_DIMS)
    g = torch.Generator().manual_seed(1234 + other)
    q, k, v = (torch.randn(batch, padded_len, heads, head_dim, generator=g) for _ in range(3))
    for t in (q, k, v):
        t[:, seq_len:] = 10 * torch.randn(t[:, seq_len:].shape, generator=g)  # loud garbage in the padding
    ref, _ = reference(q, k[:, :seq_len], v[:, :seq_len], head_dim ** -0.5)

    sp_rank = coord.get("sp_ring", 0) * ulysses + coord.get("sp_ulysses", 0)
    shard = slice(sp_rank * local, (sp_rank + 1) * local)
    out = long_context_attention(q[:, shard], k[:, shard], v[:, shard], mesh,
                                 seq_len=None if seq_len == padded_len else seq_len, attention_config=attention_config)
    assert out.shape == q[:, shard].shape and out.dtype == torch.float32
    assert torch.isfinite(out).all(), f"non-finite output in case {names} {shape} seq_len={seq_len}"
    valid = max(0, min(local, seq_len - sp_rank * local))
    torch.testing.assert_close(out[:, :valid].double(), ref[:, shard][:, :valid], atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"case {names} {shape} seq_len={seq_len}, sp rank {sp_rank}: {m}")


def _check_overlap_is_exact() -> None:
    """The pipelined Ulysses exchange computes what the plain one does (attention is independent per head)."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("sp_ulysses",))
    g = torch.Generator().manual_seed(7 + mesh.get_local_rank("sp_ulysses"))
    q, k, v = (torch.randn(2, 8, 8, 16, generator=g) for _ in range(3))
    assert ulysses_groups(8, 2) == 4
    torch.testing.assert_close(long_context_attention(q, k, v, mesh, seq_len=15),
                               long_context_attention(q, k, v, mesh, seq_len=15, overlap=False), atol=0, rtol=0)


def _check_quantised(names: tuple[str, ...], shape: tuple[int, ...], impl: str, bound: float) -> None:
    """SAGE_ATTN_* under Ulysses (the local attention after the exchange) and ring (its blocks' log-sum-exps
    merged): within the variant's bound of float64 attention (tests/test_quantized_attention.py)."""
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    sp_rank = mesh.get_local_rank(names[0])
    g = torch.Generator().manual_seed(99)
    seq_len, padded, heads, head_dim = 250, 256, 4, 32
    q, k, v = (torch.randn(1, padded, heads, head_dim, generator=g) for _ in range(3))
    ref, _ = reference(q[:, :seq_len], k[:, :seq_len], v[:, :seq_len], head_dim ** -0.5)
    local = padded // shape[0]
    shard = slice(sp_rank * local, (sp_rank + 1) * local)
    out = long_context_attention(q[:, shard], k[:, shard], v[:, shard], mesh, seq_len=seq_len, attention_config=impl)
    valid = max(0, min(local, seq_len - sp_rank * local))
    got, want = out[:, :valid].double(), ref[:, shard][:, :valid]
    assert ((got - want).norm() / want.norm()).item() < bound, (names, impl)


def _check_indivisible_heads() -> None:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("sp_ulysses",))
    x = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match=r"3 heads are not divisible by sp_ulysses degree 2"):
        long_context_attention(x, x, x, mesh)


def _worker_2() -> None:
    for case in CASES_2:
        _run_case(*case)
    _check_indivisible_heads()
    _check_overlap_is_exact()
    for dim in ("sp_ulysses", "sp_ring"):
        _check_quantised((dim,), (2,), "SAGE_ATTN_2_8_16", 0.03)
        _check_quantised((dim,), (2,), "SAGE_ATTN_2_8_8", 0.06)


def _worker_4() -> None:
    for case in CASES_4:
        _run_case(*case)


def test_long_context_attention_2_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ulysses 2 (plain and pipelined in head groups), ring 2 (each also padded), an sp dim beside another dim,
    no sp dims, indivisible heads, the quantised backends under Ulysses and ring."""
    spawn(_worker_2, 2, monkeypatch)


def test_long_context_attention_4_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ulysses 4, ring 4, USP 2 x 2 (each also padded, ring 4 with an all-padding block), sp beside cfg."""
    spawn(_worker_4, 4, monkeypatch)
