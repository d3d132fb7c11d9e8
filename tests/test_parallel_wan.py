"""The Wan DiT under sequence parallelism, on real gloo ranks, against the same DiT on one rank.

Tolerance (DiT forward, float32): parallelism changes only where attention sums (Ulysses: none;
ring: partial softmaxes merged by log-sum-exp) and pads the sequence (padded keys are dropped, padded
queries cut away). The tiny DiT's outputs are O(1); float32 reordering leaves differences of a few
1e-7 per attention, carried through 2 blocks: atol 1e-5 / rtol 1e-4 keeps a margin of ~10x, while a
misplaced shard, a leaked padded key or a wrong RoPE shard moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from gloo_ranks import spawn
from telefuser.distributed.parallelize_wan import parallelize_wan_dit
from telefuser.models.wan.dit import WanDiT, WanDiTConfig

ATOL, RTOL = 1e-5, 1e-4
CONFIG = WanDiTConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=48, num_heads=4, num_layers=2)


def _inputs(grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    f, h, w = grid
    x = torch.randn(1, CONFIG.in_dim, f, 2 * h, 2 * w, generator=g)
    return x, torch.tensor([700.0]), torch.randn(1, 12, CONFIG.text_dim, generator=g)


def _check(names: tuple[str, ...], shape: tuple[int, ...], grid: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    reference = WanDiT(CONFIG).eval()
    parallel = WanDiT(CONFIG).eval()
    parallel.load_state_dict(reference.state_dict())
    parallelize_wan_dit(parallel, init_device_mesh("cpu", shape, mesh_dim_names=names))
    x, t, context = _inputs(grid)
    with torch.inference_mode():
        expected = reference(x, t, context)
        for _ in range(2):  # a second forward reuses the RoPE shard
            got = parallel(x, t, context)
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{names} {shape} grid {grid}: {m}")


def _worker_2() -> None:
    for names in (("sp_ulysses",), ("sp_ring",)):
        _check(names, (2,), (2, 3, 4))  # 24 tokens: 12 per rank
        _check(names, (2,), (3, 3, 3))  # 27 tokens: padded to 28
    _check(("cfg", "sp_ulysses"), (1, 2), (1, 3, 5))


def _worker_4() -> None:
    _check(("sp_ring", "sp_ulysses"), (2, 2), (2, 3, 4))
    _check(("sp_ring", "sp_ulysses"), (2, 2), (1, 5, 5))  # 25 tokens: padded to 28
    _check(("sp_ulysses",), (4,), (1, 3, 3))
    _check(("sp_ring",), (4,), (1, 1, 5))  # 5 tokens on 4 ranks: the last shard is all padding


def test_sequence_parallel_dit_2_ranks(monkeypatch):
    spawn(_worker_2, 2, monkeypatch)


def test_sequence_parallel_dit_4_ranks(monkeypatch):
    spawn(_worker_4, 4, monkeypatch)


def _refuse_heads() -> None:
    model = WanDiT(WanDiTConfig(dim=48, ffn_dim=64, freq_dim=32, text_dim=48, num_heads=3, num_layers=1))
    with pytest.raises(ValueError, match="Ulysses degree 2 does not divide the DiT's 3 attention heads"):
        parallelize_wan_dit(model, init_device_mesh("cpu", (2,), mesh_dim_names=("sp_ulysses",)))


def test_ulysses_degree_must_divide_heads(monkeypatch):
    spawn(_refuse_heads, 2, monkeypatch)
