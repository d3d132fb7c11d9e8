"""Sparse attention masks (their one builder, telefuser.schema.block_masks, which the compiler's density and
telefuser.ops.sparse_attention both use) against reference formulas written here independently: token-level
masks built pair by pair from the rule as docs/sparse_and_caches.md states it, turned into blocks with a literal
reading of the published shrink rule (mit-han-lab/radial-attention `shrinkMaskStrict`)."""

from __future__ import annotations

import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from telefuser.ops import sparse_attention as sa
from telefuser.schema import block_masks


# ---------------------------------------------------------------- radial, by the letter


def radial_token_pair(i: int, j: int, t: int, bs: int, decay: float) -> torch.Tensor:
    """The T x T token mask of query frame i against key frame j (Radial Attention, Wan)."""
    if j == 0:
        return torch.ones(t, t, dtype=torch.bool)
    d = abs(i - j)
    if d == 0:
        width = t
    elif d == 1:
        width = t // 2
    else:
        width = max(2 ** t.bit_length() / 2 ** d.bit_length() * decay, bs)
    r = torch.arange(t)
    band = (r[None, :] - r[:, None]).abs() <= width
    length = 2 ** t.bit_length() / 2 ** d.bit_length()
    keep = True if length >= bs else d % int(bs / length) == 0
    return band & keep


def shrink(pair: torch.Tensor, bs: int) -> torch.Tensor:
    n = pair.shape[0] // bs
    tiles = pair[: n * bs, : n * bs].reshape(n, bs, n, bs)
    col_density = tiles.sum(1).double() / bs  # [n, n, bs]
    nonzero = (col_density > 0).sum(-1).double()
    high = (col_density > 1 / 3).sum(-1).double()
    return high / (nonzero + 1e-9) > 0.6


def radial_reference(grid, bs, decay):
    f, h, w = grid
    t = h * w
    m = math.ceil(f * t / bs)
    out = torch.zeros(m, m, dtype=torch.bool)
    nb = (t - 1) // bs + 1
    for i in range(f):
        for j in range(f):
            rr, rc = (i * t) % bs, (j * t) % bs
            padded = torch.zeros(rr + nb * bs, rc + nb * bs, dtype=torch.bool)
            padded[rr: rr + t, rc: rc + t] = radial_token_pair(i, j, t, bs, decay)
            blocks = shrink(padded, bs)
            r0, c0 = i * t // bs, j * t // bs
            r1, c1 = min(r0 + blocks.shape[0], m), min(c0 + blocks.shape[1], m)
            out[r0:r1, c0:c1] |= blocks[: r1 - r0, : c1 - c0]
    return out


@pytest.mark.parametrize("grid,bs,decay", [
    ((6, 4, 8), 16, 1.0),     # 32 tokens a frame: frames on block boundaries
    ((7, 5, 6), 16, 1.0),     # 30 tokens a frame: frames straddle blocks, a ragged last block
    ((9, 6, 10), 32, 0.5),    # 60 tokens a frame, decay 0.5
    ((11, 3, 5), 16, 1.0),    # 15 tokens a frame: frames smaller than a block, far frames subsampled
])
def test_radial_mask_matches_the_published_rule(grid, bs, decay):
    mask = sa.radial_block_mask(grid, bs, decay)
    m = math.ceil(math.prod(grid) / bs)
    assert mask.shape == (m, m) and mask.dtype == torch.bool
    assert torch.equal(mask, radial_reference(grid, bs, decay))


def test_radial_mask_properties():
    grid, bs = (16, 4, 8), 16  # 32 tokens (2 blocks) a frame: 32 blocks
    mask = sa.radial_block_mask(grid, bs)
    blocks_per_frame = 2
    frame = torch.arange(mask.shape[0]) // blocks_per_frame
    dist = (frame[:, None] - frame[None, :]).abs()
    assert mask[dist == 0].all()  # dense within a frame
    assert mask[:, :blocks_per_frame].all()  # the first frame is an attention sink
    body = mask[blocks_per_frame:, blocks_per_frame:]  # away from the sink, symmetric (frames on block bounds)
    assert torch.equal(body, body.T)
    # temporal decay: the fraction of kept block pairs falls as the distance doubles (distances grouped by
    # bit length, 1, 2-3, 4-7, 8-15: within a group far frames are subsampled, d % split == 0)
    d_body = dist[2:, 2:]
    kept = [body[(d_body >= lo) & (d_body < 2 * lo)].float().mean().item() for lo in (1, 2, 4, 8)]
    assert kept == sorted(kept, reverse=True) and kept[-1] < kept[0], kept
    assert 0 < sa.density(mask) < 1


def test_radial_density_shrinks_with_length_and_decay():
    short = sa.density(sa.radial_block_mask((8, 4, 8), 16))
    long = sa.density(sa.radial_block_mask((32, 4, 8), 16))
    assert long < short
    assert sa.density(sa.radial_block_mask((16, 8, 16), 16, 0.25)) <= sa.density(sa.radial_block_mask((16, 8, 16), 16, 1.0))


def test_masks_are_cached_per_shape_and_pattern():
    a = sa.radial_block_mask((5, 4, 8), 16)
    assert sa.radial_block_mask((5, 4, 8), 16) is a
    assert sa.radial_block_mask((5, 4, 8), 16, 0.5) is not a
    cfg = SimpleNamespace(sparse_impl="radial", block_size=16, decay_factor=1.0)
    assert sa.block_layout_for(cfg, (5, 4, 8)) is sa.block_layout_for(cfg, (5, 4, 8))
    assert sa.block_mask_for(cfg, (5, 4, 8)) is a


# ---------------------------------------------------------------- local window


def local_reference(grid, bs, r):
    f, h, w = grid
    ff, hh, ww = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([ff.flatten(), hh.flatten(), ww.flatten()], 1)
    tokens = ((coords[:, None, :] - coords[None, :, :]).abs() <= r).all(-1)  # [S, S]
    s = tokens.shape[0]
    m = math.ceil(s / bs)
    padded = torch.zeros(m * bs, m * bs, dtype=torch.bool)
    padded[:s, :s] = tokens
    return padded.view(m, bs, m, bs).any(3).any(1)


@pytest.mark.parametrize("grid,bs,r", [((4, 6, 6), 16, 1), ((5, 3, 7), 16, 2), ((3, 8, 8), 32, 1)])
def test_local_mask_matches_token_windows(grid, bs, r):
    mask = sa.local_block_mask(grid, bs, r)
    ref = local_reference(grid, bs, r)
    assert torch.equal(mask, ref)
    assert torch.equal(mask, mask.T)  # a window relation is symmetric
    assert mask.diagonal().all()


def test_the_one_builder_matches_the_stated_rules_on_fresh_random_shapes(monkeypatch):
    """The builder the compiler (density) and ops (the kernel's layout) share, against the token-level references
    above on shapes drawn afresh each run (the seed is in the failure message); ops' tensors are its masks."""
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    monkeypatch.setattr(block_masks, "_QUERY_CHUNK", 3)  # the local mask's chunked passes, on small shapes
    for _ in range(6):
        grid = (rng.randint(1, 12), rng.randint(1, 8), rng.randint(1, 9))
        bs, decay, radius = rng.choice((16, 32)), round(rng.uniform(0.05, 1.0), 3), rng.randint(1, 4)
        where = f"seed {seed}: grid {grid}, block_size {bs}, decay_factor {decay}, local_window_size {radius}"
        radial = block_masks.radial_mask(grid, bs, decay)
        assert np.array_equal(radial, radial_reference(grid, bs, decay).numpy()), where
        local = block_masks._local.__wrapped__(grid, bs, radius)  # uncached: built with the patched chunk
        assert np.array_equal(local, local_reference(grid, bs, radius).numpy()), where
        assert np.array_equal(sa.radial_block_mask(grid, bs, decay).numpy(), radial), where
        assert np.array_equal(sa.local_block_mask(grid, bs, radius).numpy(), local), where
        assert sa.density(sa.radial_block_mask(grid, bs, decay)) == block_masks.density(radial) == radial.mean()
    assert not radial.flags.writeable  # shared through the cache
    with pytest.raises(ValueError, match="power of two"):
        block_masks.radial_mask((2, 2, 2), 48)
    with pytest.raises(ValueError, match="decay_factor"):
        block_masks.radial_mask((2, 2, 2), 16, 0.0)
    with pytest.raises(ValueError, match="sparse_impl"):
        block_masks.block_mask("sliding", (2, 2, 2), 16)


def test_local_mask_density_grows_with_the_window():
    grid = (6, 8, 8)
    d = [sa.density(sa.local_block_mask(grid, 16, r)) for r in (1, 2, 4, 8)]
    assert d == sorted(d) and d[0] < 1 and d[-1] == 1.0
    with pytest.raises(ValueError, match="local_window_size"):
        sa.local_block_mask(grid, 16, 0)


def test_density():
    assert sa.density(torch.ones(4, 4, dtype=torch.bool)) == 1.0
    assert sa.density(torch.eye(4, dtype=torch.bool)) == 0.25


# ---------------------------------------------------------------- dense steps and layers


def test_use_dense():
    cfg = SimpleNamespace(sparse_impl="radial", dense_timesteps=2, dense_layers=1)
    table = [[sa.use_dense(step, layer, cfg) for layer in range(3)] for step in range(4)]
    assert table == [[True] * 3, [True] * 3, [True, False, False], [True, False, False]]
    assert sa.use_dense(5, 5, None) and sa.use_dense(5, 5, SimpleNamespace(sparse_impl=None))
    zero = SimpleNamespace(sparse_impl="local", dense_timesteps=0, dense_layers=0)
    assert not sa.use_dense(0, 0, zero)


# ---------------------------------------------------------------- the entry point


def test_sparse_attention_reference_on_cpu_equals_masked_sdpa():
    grid, bs = (4, 3, 8), 16  # 96 tokens, 6 blocks
    mask = sa.radial_block_mask(grid, bs)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 96, 2, 32, generator=g) for _ in range(3))
    out = sa.sparse_attention(q, k, v, block_mask=mask, block_size=bs, use_kernel=False)
    tokens = mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)),
                                                           attn_mask=tokens).transpose(1, 2)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
                    reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")
def test_sparse_attention_kernel_equals_reference_on_a_radial_layout():
    grid, bs = (5, 3, 6), 16  # 90 tokens: a ragged last block
    cfg = SimpleNamespace(sparse_impl="radial", block_size=bs, decay_factor=1.0)
    layout = sa.block_layout_for(cfg, grid)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 90, 2, 64, generator=g) for _ in range(3))
    out = sa.sparse_attention(q, k, v, layout=layout)  # the kernel, under the interpreter
    ref = sa.sparse_attention(q, k, v, layout=layout, use_kernel=False)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-5


def test_sparse_or_dense_attention_and_padding():
    grid, bs = (4, 3, 8), 16  # 96 tokens
    cfg = SimpleNamespace(sparse_impl="radial", block_size=bs, decay_factor=1.0, dense_timesteps=1, dense_layers=1)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 100, 2, 32, generator=g) for _ in range(3))  # padded to 100 (sequence parallel)
    calls = []

    def dense(*args):
        calls.append(args)
        return args[0]

    assert sa.sparse_or_dense_attention(q, k, v, cfg, grid, 0, 3, dense) is q  # a dense step
    assert sa.sparse_or_dense_attention(q, k, v, cfg, grid, 4, 0, dense) is q  # a dense layer
    assert len(calls) == 2
    out = sa.sparse_or_dense_attention(q, k, v, cfg, grid, 1, 1, dense)
    ref = sa.sparse_attention(q[:, :96].contiguous(), k[:, :96].contiguous(), v[:, :96].contiguous(),
                              block_mask=sa.radial_block_mask(grid, bs), block_size=bs, use_kernel=False)
    assert len(calls) == 2 and out.shape == q.shape
    assert torch.allclose(out[:, :96], ref, atol=1e-5) and out[:, 96:].abs().max() == 0
    with pytest.raises(ValueError, match="ring"):
        sa.sparse_or_dense_attention(q[:, :50], k[:, :50], v[:, :50], cfg, grid, 1, 1, dense)


# ---------------------------------------------------------------- on the tiny DiT, through the attend seam


@torch.no_grad()
def test_tiny_dit_through_the_attend_seam_dense_steps_and_layers():
    """The wiring the integrator does: each block's `self_attn.attend` replaced by sparse_or_dense_attention
    with its layer index, the step index and the grid from the DiT's input; dense steps and layers give the
    plain DiT's attention bit for bit, a window covering everything gives dense attention, radial differs."""
    from telefuser.models.tiny import TINY_ARCH, tiny_state_dict
    from telefuser.models.wan.dit import WanDiT, WanDiTConfig
    from telefuser.ops.attention import attention

    dit = WanDiT(WanDiTConfig(**TINY_ARCH["dit"]))
    dit.load_state_dict(tiny_state_dict("dit", TINY_ARCH["dit"]))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 16, 8, 4, 16, generator=g)  # grid (8, 2, 8): 128 tokens, a frame per block of 16
    t, context = torch.tensor([900.0]), torch.randn(1, 8, TINY_ARCH["dit"]["text_dim"], generator=g)
    ref = dit(x, t, context)
    grid = (8, 2, 8)
    state = {"step": 0}
    calls = {"sparse": 0}

    def bind(cfg):
        for index, block in enumerate(dit.blocks):
            def attend(q, k, v, index=index):
                if not sa.use_dense(state["step"], index, cfg):
                    calls["sparse"] += 1
                return sa.sparse_or_dense_attention(q, k, v, cfg, grid, state["step"], index, dense=attention)
            block.self_attn.attend = attend

    try:
        radial = SimpleNamespace(sparse_impl="radial", block_size=16, decay_factor=1.0, dense_timesteps=1,
                                 dense_layers=1)
        bind(radial)
        assert torch.equal(dit(x, t, context), ref) and calls["sparse"] == 0  # step 0: dense everywhere
        state["step"] = 1
        out = dit(x, t, context)
        assert calls["sparse"] == 1  # layer 1 only (dense_layers = 1)
        assert sa.density(sa.radial_block_mask(grid, 16)) < 1 and not torch.allclose(out, ref, atol=1e-4)
        wide = SimpleNamespace(sparse_impl="local", block_size=16, local_window_size=8, dense_timesteps=0,
                               dense_layers=0)
        assert sa.density(sa.local_block_mask(grid, 16, 8)) == 1.0
        bind(wide)
        assert torch.allclose(dit(x, t, context), ref, atol=1e-5, rtol=1e-4)
    finally:
        for block in dit.blocks:
            del block.self_attn.attend
