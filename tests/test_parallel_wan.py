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


def _first_frame_timesteps(t: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Wan2.2 TI2V's per-token timesteps [1, S]: 0 for the first latent frame's tokens, t for the others."""
    f, h, w = grid
    per_token = t.reshape(1, 1).expand(1, f * h * w).clone()
    per_token[:, : h * w] = 0.0
    return per_token


def _check(names: tuple[str, ...], shape: tuple[int, ...], grid: tuple[int, int, int], per_token: bool = False) -> None:
    torch.manual_seed(0)
    reference = WanDiT(CONFIG).eval()
    parallel = WanDiT(CONFIG).eval()
    parallel.load_state_dict(reference.state_dict())
    parallelize_wan_dit(parallel, init_device_mesh("cpu", shape, mesh_dim_names=names))
    x, t, context = _inputs(grid)
    if per_token:  # per-token modulation [1, S, 6, dim] and head modulation [1, S, dim], sharded with the tokens
        t = _first_frame_timesteps(t, grid)
    with torch.inference_mode():
        expected = reference(x, t, context)
        for _ in range(2):  # a second forward reuses the RoPE shard
            got = parallel(x, t, context)
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{names} {shape} grid {grid} per_token={per_token}: {m}")
        if per_token:  # and a per-video forward after a per-token one leaves no per-token shard behind
            torch.testing.assert_close(parallel(x, t[:, -1], context), reference(x, t[:, -1], context), atol=ATOL, rtol=RTOL)


def _worker_2() -> None:
    for names in (("sp_ulysses",), ("sp_ring",)):
        _check(names, (2,), (2, 3, 4))  # 24 tokens: 12 per rank
        _check(names, (2,), (3, 3, 3))  # 27 tokens: padded to 28
    _check(("cfg", "sp_ulysses"), (1, 2), (1, 3, 5))
    for names in (("sp_ulysses",), ("sp_ring",)):  # Wan2.2 TI2V: a timestep per token
        _check(names, (2,), (2, 3, 4), per_token=True)
        _check(names, (2,), (3, 3, 3), per_token=True)  # 27 tokens: padded to 28, the padding's modulation too


def _worker_4() -> None:
    _check(("sp_ring", "sp_ulysses"), (2, 2), (2, 3, 4))
    _check(("sp_ring", "sp_ulysses"), (2, 2), (1, 5, 5))  # 25 tokens: padded to 28
    _check(("sp_ulysses",), (4,), (1, 3, 3))
    _check(("sp_ring",), (4,), (1, 1, 5))  # 5 tokens on 4 ranks: the last shard is all padding
    _check(("sp_ring", "sp_ulysses"), (2, 2), (3, 2, 3), per_token=True)  # 18 tokens: padded to 20


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
