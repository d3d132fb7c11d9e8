"""The Wan DiT under tensor parallelism, on real gloo ranks, against the same DiT on one rank.

Tolerance (DiT forward, float32): tensor parallelism changes only the order of float32 sums: the
row-wise projections (o, ffn.2) add tp partial products in an all-reduce instead of one dot product
over the full width, and the q/k norms add tp partial sums of squares instead of one mean. Each
reordering moves a value by a few ulps (~1e-7 relative); the tiny DiT's outputs are O(1) (max ~2.1)
and carry such changes through 2 blocks of about eight projections each. Measured: at most 6e-7 at
tp = 2 and 4. atol 1e-5 / rtol 1e-4 keeps a margin of over 10x, while a wrong shard or a norm over
the local features only (measured: 1.5e-2 at tp = 2 in T2V, 3e-2 in I2V) fails it by orders of
magnitude (a head count left at the global value does not even run: RoPE's width no longer fits).

A bfloat16 cast after parallelising is checked against the bfloat16 one-rank model at atol/rtol
5e-2: bf16 carries 8 significant bits (one step is 7.8e-3 for values in [1, 2)), and the same
reorderings, rounded to bf16 at every projection and norm output, can flip the last bit. Measured:
at most 7.8e-3 (one step) at tp = 2, a margin of 6x.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from gloo_ranks import spawn
from telefuser.distributed.tensor_parallel import ShardedRMSNorm, apply_tensor_parallel
from telefuser.models.wan.dit import CLIP_DIM, WanDiT, WanDiTConfig

ATOL, RTOL = 1e-5, 1e-4
BF16_TOL = 5e-2
T2V = WanDiTConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=48, num_heads=4, num_layers=2)
I2V = WanDiTConfig(model_type="i2v", in_dim=36, dim=64, ffn_dim=128, freq_dim=32, text_dim=48, num_heads=4,
                   num_layers=2)


def _inputs(config: WanDiTConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    latent = 16  # I2V: 16 noise channels + 20 conditioning channels (`y`), in_dim 36
    inputs = {"x": torch.randn(1, latent, 2, 6, 8, generator=g), "t": torch.tensor([700.0]),
              "context": torch.randn(1, 12, config.text_dim, generator=g)}
    if config.model_type == "i2v":
        inputs["y"] = torch.randn(1, config.in_dim - latent, 2, 6, 8, generator=g)
        inputs["clip_fea"] = torch.randn(1, 257, CLIP_DIM, generator=g)
    return inputs


def _models(config: WanDiTConfig) -> tuple[WanDiT, WanDiT]:
    torch.manual_seed(0)  # every rank builds the same weights
    reference = WanDiT(config).eval()
    parallel = WanDiT(config).eval()
    parallel.load_state_dict(reference.state_dict())
    return reference, parallel


def _check(config: WanDiTConfig, names: tuple[str, ...], shape: tuple[int, ...]) -> None:
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    tp = mesh["tp"].size()
    reference, parallel = _models(config)
    keys = set(parallel.state_dict())
    assert apply_tensor_parallel(parallel, mesh) is parallel
    assert set(parallel.state_dict()) == keys  # parameter names unchanged

    tp_rank = mesh.get_local_rank("tp")
    rows = slice(tp_rank * config.dim // tp, (tp_rank + 1) * config.dim // tp)
    for ref_block, block in zip(reference.blocks, parallel.blocks):
        q = block.self_attn.q.weight
        assert isinstance(q, DTensor) and q.shape == (config.dim, config.dim)
        assert q.to_local().shape == (config.dim // tp, config.dim)
        torch.testing.assert_close(q.to_local(), ref_block.self_attn.q.weight[rows], atol=0, rtol=0)
        o = block.cross_attn.o.weight.to_local()
        assert o.shape == (config.dim, config.dim // tp)
        assert block.ffn[0].weight.shape == (config.ffn_dim // tp, config.dim)  # plain local rows
        assert block.ffn[2].weight.to_local().shape == (config.dim, config.ffn_dim // tp)
        assert block.self_attn.num_heads == block.cross_attn.num_heads == config.num_heads // tp
        norm = block.self_attn.norm_q
        assert isinstance(norm, ShardedRMSNorm) and norm.weight.to_local().shape == (config.dim // tp,)
        if config.model_type == "i2v":
            assert block.cross_attn.k_img.weight.to_local().shape == (config.dim // tp, config.dim)
            assert isinstance(block.cross_attn.norm_k_img, ShardedRMSNorm)

    inputs = _inputs(config)
    label = f"{config.model_type} {names} {shape}"
    with torch.inference_mode():
        expected = reference(**inputs)
        got = parallel(**inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{label}: {m}")

    # Every rank of the tp group computes the whole output: they agree bit for bit.
    gathered = [torch.empty_like(got) for _ in range(tp)]
    dist.all_gather(gathered, got.contiguous(), group=mesh.get_group("tp"))
    for other in gathered:
        torch.testing.assert_close(other, got, atol=0, rtol=0, msg=lambda m: f"{label}, tp ranks differ: {m}")


def _check_bf16_after_tp() -> None:
    """A dtype cast after parallelising casts the DTensor shards too."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    reference, parallel = _models(T2V)
    apply_tensor_parallel(parallel, mesh)
    reference.to(torch.bfloat16)
    parallel.to(torch.bfloat16)
    assert parallel.blocks[0].self_attn.q.weight.to_local().dtype == torch.bfloat16
    inputs = _inputs(T2V)
    with torch.inference_mode():
        got, expected = parallel(**inputs), reference(**inputs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=BF16_TOL, rtol=BF16_TOL)


def _check_split_weights_come_from_first_rank() -> None:
    """The split weights are scattered from the tp group's first rank: other ranks' values do not count."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    reference, parallel = _models(T2V)
    if mesh.get_local_rank("tp") != 0:
        with torch.no_grad():
            for block in parallel.blocks:
                for part in (block.self_attn, block.cross_attn, block.ffn):
                    for param in part.parameters():
                        param.mul_(-3.0)
    apply_tensor_parallel(parallel, mesh)
    inputs = _inputs(T2V)
    with torch.inference_mode():
        torch.testing.assert_close(parallel(**inputs), reference(**inputs), atol=ATOL, rtol=RTOL)


def _check_refusals() -> None:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    three_heads = WanDiT(WanDiTConfig(dim=48, ffn_dim=64, freq_dim=32, text_dim=48, num_heads=3, num_layers=1))
    before = {k: v.clone() for k, v in three_heads.state_dict().items()}
    with pytest.raises(ValueError, match="tp degree 2 does not divide the DiT's 3 attention heads"):
        apply_tensor_parallel(three_heads, mesh)
    assert three_heads.blocks[0].self_attn.num_heads == 3  # untouched
    assert all(torch.equal(v, before[k]) for k, v in three_heads.state_dict().items())
    odd_ffn = WanDiT(WanDiTConfig(dim=32, ffn_dim=33, freq_dim=32, text_dim=48, num_heads=2, num_layers=1))
    with pytest.raises(ValueError, match="tp degree 2 does not divide the DiT's ffn_dim 33"):
        apply_tensor_parallel(odd_ffn, mesh)
    with pytest.raises(ValueError, match="needs a device mesh with a 'tp' dimension"):
        apply_tensor_parallel(odd_ffn, init_device_mesh("cpu", (2,), mesh_dim_names=("cfg",)))
    twice = WanDiT(T2V)
    apply_tensor_parallel(twice, mesh)
    with pytest.raises(ValueError, match="already tensor-parallel"):
        apply_tensor_parallel(twice, mesh)
    # tp degree 1 (here the tp dim of a ("cfg", "tp") = (2, 1) mesh) is a no-op.
    plain = WanDiT(T2V)
    apply_tensor_parallel(plain, init_device_mesh("cpu", (2, 1), mesh_dim_names=("cfg", "tp")))
    assert not any(isinstance(p, DTensor) for p in plain.parameters())


def _worker_2() -> None:
    for config in (T2V, I2V):
        _check(config, ("tp",), (2,))
    _check(T2V, ("cfg", "tp"), (1, 2))
    _check_bf16_after_tp()
    _check_split_weights_come_from_first_rank()
    _check_refusals()


def _worker_4() -> None:
    for config in (T2V, I2V):
        _check(config, ("tp",), (4,))
        _check(config, ("cfg", "tp"), (2, 2))  # two tp groups: {0, 1} and {2, 3}


def test_tensor_parallel_dit_2_ranks(monkeypatch):
    spawn(_worker_2, 2, monkeypatch)


def test_tensor_parallel_dit_4_ranks(monkeypatch):
    spawn(_worker_4, 4, monkeypatch)
