"""HunyuanVideo-1.5 under sequence and tensor parallelism on real gloo ranks: the joint attention op against float64
attention on the whole sequence; the DiT forward (base and MeanFlow SR, with single-stream blocks, a padded batch of
two; tp 2 and Ulysses 2 x tp 2 on double-stream blocks) against the same DiT on one rank, on fresh random inputs; the
VAE's tile-parallel decode against its tiled decode.

Tolerances.
- Op (`joint_long_context_attention`), float32 standard normals, D = 16: as tests/test_long_context_attention.py
  (float32 rounding through scores, exp, sums over <= 40 keys and an LSE merge of <= 5 partials leaves a few 1e-7
  against float64); atol 2e-5 / rtol 1e-4 keeps a margin of >25x, while a dropped, duplicated or misplaced key
  block, a leaked padded key (padding holds 10x values) or a context key counted twice moves outputs by 1e-2 or more.
  The joint (context) output must be bitwise equal on every rank: each rank runs the context stream itself.
- DiT forward, float32: parallelism only reorders sums (attention's; ring: partials merged by log-sum-exp; tp: the
  row-wise projections' all-reduce) and pads the video sequence; the outputs are O(1) and errors of a few 1e-7 per
  attention pass through 3 blocks: atol 1e-5 / rtol 1e-4 (as tests/test_parallel_wan.py), while a wrong shard, RoPE
  shard or leaked padded key moves them by 1e-2.
- VAE: bitwise (the same tiles, per-tile function and blend order).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from gloo_ranks import spawn
from telefuser.distributed.parallelize_hy15 import parallelize_hy15_dit
from telefuser.distributed.sequence import shard_sequence
from telefuser.distributed.tensor_parallel_hy15 import apply_tensor_parallel_hy15
from telefuser.models.hunyuan15.dit import HunyuanVideo15DiT, HunyuanVideo15DiTConfig
from telefuser.ops.joint_attention import joint_long_context_attention

OP_ATOL, OP_RTOL = 2e-5, 1e-4
ATOL, RTOL = 1e-5, 1e-4
CONFIG = HunyuanVideo15DiTConfig(in_channels=9, out_channels=4, hidden_size=64, heads_num=4, mlp_hidden_dim=96,
                                 double_blocks=2, single_blocks=1, rope_dim_list=[4, 6, 6], text_states_dim=24,
                                 refiner_blocks=1, byt5_dim=8, byt5_hidden=16, vision_states_dim=12)

DOUBLE_ONLY = HunyuanVideo15DiTConfig(**{**CONFIG.__dict__, "single_blocks": 0})  # tp: double-stream blocks only


# ------------------------------------------------------------------ the op


def _reference(q, k, v, jq, jk, jv, lengths):
    """Float64 attention of [q, jq] over [k, valid jk] per batch element: (out, joint out)."""
    outs, jouts = [], []
    for b, n in enumerate(lengths):
        qq = torch.cat([q[b], jq[b]]).double()
        kk, vv = torch.cat([k[b], jk[b, :n]]).double(), torch.cat([v[b], jv[b, :n]]).double()
        scores = torch.einsum("snd,tnd->nst", qq, kk) / qq.shape[-1] ** 0.5
        o = torch.einsum("nst,tnd->snd", scores.softmax(-1), vv)
        outs.append(o[: q.shape[1]])
        jouts.append(o[q.shape[1]:])
    return torch.stack(outs), torch.stack(jouts)


def _op_case(names: tuple[str, ...], shape: tuple[int, ...], seq: int, lengths: list[int] | None,
             heads: int = 4) -> None:
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    g = torch.Generator().manual_seed(seq * 10 + len(names))
    b, joint = 2, 7
    q, k, v = (torch.randn(b, seq, heads, 16, generator=g) for _ in range(3))
    jq, jk, jv = (torch.randn(b, joint, heads, 16, generator=g) for _ in range(3))
    if lengths is not None:  # padded joint keys hold large values: a leak shows
        for i, n in enumerate(lengths):
            jk[i, n:], jv[i, n:] = 10.0, 10.0
    ref, jref = _reference(q, k, v, jq, jk, jv, lengths or [joint] * b)
    shards = [shard_sequence(t, 1, mesh) for t in (q, k, v)]
    out, jout = joint_long_context_attention(*shards, jq, jk, jv, mesh, seq_len=seq, joint_lengths=lengths)
    size = out.shape[1] * dist.get_world_size()
    full = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(full, out.contiguous())
    # sp rank order is the world order here (sp dims only): shards are contiguous in rank order
    got = torch.cat(full, 1)[:, :seq]
    assert size >= seq
    what = f"{names} {shape} seq {seq} lengths {lengths}"
    torch.testing.assert_close(got.double(), ref, atol=OP_ATOL, rtol=OP_RTOL, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(jout.double(), jref, atol=OP_ATOL, rtol=OP_RTOL, msg=lambda m: f"{what} joint: {m}")
    every = [torch.empty_like(jout) for _ in range(dist.get_world_size())]
    dist.all_gather(every, jout.contiguous())
    assert all(torch.equal(e, every[0]) for e in every), f"{what}: the joint output differs between ranks"
    if names == ("sp_ulysses",):  # the head-group pipeline against the one-exchange path: the same attention per head
        plain, jplain = joint_long_context_attention(*shards, jq, jk, jv, mesh, seq_len=seq, joint_lengths=lengths,
                                                     overlap=False)
        assert torch.equal(plain, out) and torch.equal(jplain, jout), f"{what}: overlap=False differs"


def _op_worker_2() -> None:
    for names in (("sp_ulysses",), ("sp_ring",)):
        _op_case(names, (2,), 12, None)
        _op_case(names, (2,), 11, [7, 3])  # padded sequence, unequal joint lengths
        _op_case(names, (2,), 9, [4, 4])  # equal joint lengths under the full width


def _op_worker_4() -> None:
    _op_case(("sp_ring", "sp_ulysses"), (2, 2), 13, [5, 7])
    _op_case(("sp_ulysses",), (4,), 10, None)
    _op_case(("sp_ulysses",), (4,), 10, [3, 7], heads=8)  # 2 heads per rank: two pipelined head groups
    _op_case(("sp_ring",), (4,), 3, [2, 6])  # 3 tokens on 4 ranks: the last shard is all padding


def test_joint_attention_2_ranks(monkeypatch):
    spawn(_op_worker_2, 2, monkeypatch)


def test_joint_attention_4_ranks(monkeypatch):
    spawn(_op_worker_4, 4, monkeypatch)


# ------------------------------------------------------------------ the DiT


def _dit_inputs(grid: tuple[int, int, int], config: HunyuanVideo15DiTConfig, batch: int) -> dict:
    g = torch.Generator().manual_seed(sum(grid) + batch)
    f, h, w = grid
    text_mask = torch.ones(batch, 9, dtype=torch.int64)
    text_mask[-1, 6:] = 0  # batch 2: the second prompt is shorter (a padded, masked context)
    byt5_mask = torch.ones(batch, 5, dtype=torch.int64)
    inputs = {"x": torch.randn(batch, config.out_channels, f, h, w, generator=g),
              "t": torch.full((batch,), 650.0),
              "text_states": torch.randn(batch, 9, config.text_states_dim, generator=g),
              "text_mask": text_mask, "byt5_states": torch.randn(batch, 5, config.byt5_dim, generator=g),
              "byt5_mask": byt5_mask, "vision_states": torch.randn(1, 4, config.vision_states_dim, generator=g),
              "y": torch.randn(batch, config.in_channels - config.out_channels, f, h, w, generator=g)}
    if config.use_meanflow:
        inputs["t_r"] = torch.full((batch,), 300.0)
    return inputs


def _dit_case(names: tuple[str, ...], shape: tuple[int, ...], grid: tuple[int, int, int], batch: int = 1,
              config: HunyuanVideo15DiTConfig = CONFIG) -> None:
    torch.manual_seed(0)
    reference = HunyuanVideo15DiT(config).eval()
    parallel = HunyuanVideo15DiT(config).eval()
    parallel.load_state_dict(reference.state_dict())
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    if "tp" in names:
        apply_tensor_parallel_hy15(parallel, mesh)
    parallelize_hy15_dit(parallel, mesh)
    inputs = _dit_inputs(grid, config, batch)
    with torch.inference_mode():
        expected = reference(**inputs)
        for _ in range(2):  # a second forward reuses the RoPE shard and the context lengths
            got = parallel(**inputs)
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{names} {shape} grid {grid} batch {batch}: {m}")
        assert expected.abs().mean() > 0.1  # not a degenerate output


def _dit_worker_2() -> None:
    for names in (("sp_ulysses",), ("sp_ring",)):
        _dit_case(names, (2,), (2, 3, 4))  # 24 video tokens: 12 per rank
        _dit_case(names, (2,), (3, 3, 3), batch=2)  # 27: padded to 28; a padded context in the batch
    _dit_case(("cfg", "sp_ulysses"), (1, 2), (1, 3, 5))
    sr = HunyuanVideo15DiTConfig(**{**CONFIG.__dict__, "in_channels": 14, "use_meanflow": True, "single_blocks": 0})
    _dit_case(("sp_ulysses",), (2,), (2, 2, 3), config=sr)  # the MeanFlow SR DiT: the same blocks
    _dit_case(("tp",), (2,), (2, 3, 3), batch=2, config=DOUBLE_ONLY)
    _refuse_heads()
    _vae_parallel()


def _dit_worker_4() -> None:
    _dit_case(("sp_ring", "sp_ulysses"), (2, 2), (2, 3, 4), batch=2)
    _dit_case(("sp_ulysses",), (4,), (1, 3, 3))  # 9 tokens: padded to 12
    _dit_case(("sp_ring",), (4,), (1, 1, 3))  # 3 tokens on 4 ranks: the last shard is all padding
    _dit_case(("sp_ulysses", "tp"), (2, 2), (2, 3, 4), config=DOUBLE_ONLY)  # Ulysses over each rank's 2 heads


def test_sequence_parallel_hy15_dit_2_ranks(monkeypatch):
    spawn(_dit_worker_2, 2, monkeypatch)


def test_sequence_parallel_hy15_dit_4_ranks(monkeypatch):
    spawn(_dit_worker_4, 4, monkeypatch)


def _refuse_heads() -> None:
    model = HunyuanVideo15DiT(HunyuanVideo15DiTConfig(**{**CONFIG.__dict__, "hidden_size": 48, "heads_num": 3,
                                                         "rope_dim_list": [4, 6, 6]}))
    with pytest.raises(ValueError, match="Ulysses degree 2 does not divide the HunyuanVideo-1.5 DiT's 3 attention"):
        parallelize_hy15_dit(model, init_device_mesh("cpu", (2,), mesh_dim_names=("sp_ulysses",)))


def _vae_parallel() -> None:
    """The HunyuanVideo-1.5 VAE through the Wan tile-parallel decode: bit for bit its one-rank tiled decode (the same
    tiles, per-tile function and blend order), and a real tiling (not the untiled picture)."""
    from telefuser.distributed.vae_parallel import parallel_decode
    from telefuser.models.hunyuan15.vae import HunyuanVideo15VAE, HunyuanVideo15VAEConfig

    torch.manual_seed(1)
    vae = HunyuanVideo15VAE(HunyuanVideo15VAEConfig(latent_channels=4, block_out_channels=[8, 16, 16],
                                                    layers_per_block=1, spatial_ratio=4, temporal_ratio=2)).eval()
    z = torch.randn(1, 4, 2, 7, 9, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = parallel_decode(vae, z, None, (4, 4))  # 3 x 3 tiles dealt over 2 ranks
        if dist.get_rank() == 0:
            assert torch.equal(got, vae.decode(z, tiled=True, tile_size=(4, 4)))
            assert not torch.allclose(got, vae.decode(z), atol=1e-3)
        else:
            assert got is None
