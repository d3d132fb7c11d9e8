"""HunyuanVideo-1.5's SSTA (`telefuser.ops.ssta`, `telefuser.schema.ssta`) against an independent float64 evaluation of
the published forward (HunyuanVideo-1.5 `ssta_attention.py`, flex-block-attn with attn_sparse_type "ssta",
importance sampling, zero padding, per-head masks), written here token by token with loops over tiles.

Tolerances: the PyTorch path (float32 scores and softmax over at most a few hundred keys) against float64: 2e-5
absolute on unit-scale inputs (float32 rounding of dot products of 16 terms, ~1e-6 each, through a softmax of
weights <= 1). The kernel (TRITON_INTERPRET=1, float32 IEEE dots) against the PyTorch path: 2e-5 for the same
reason. The quantised block-sparse mode against float64: tests/test_sage_sparse.py's bounds (relative L2 3% with
16-bit P·V), which a mask does not change. Tile choice is compared exactly (the scores' float32 rounding is far
below the gaps between the random tiles' importances, checked before comparing).
"""

from __future__ import annotations

import itertools
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from telefuser.ops import ssta
from telefuser.schema import ssta as geometry

needs_kernel = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")


def config(tile=(2, 4, 4), win=(1, 3, 3), topk=4, lam=0.7):
    return SimpleNamespace(tile_size=tile, win_size=win, ssta_topk=topk, ssta_lambda=lam)


# ---- the published forward, independently: coordinates and loops -----------------------------------------------

def ref_tiles(grid, tile):
    """[(tile coords, [token index into the padded grid's tile-ordered sequence or -1 for padding, ...]), ...]:
    every tile's positions in (t, h, w) order; -1 marks a zero-padded position."""
    counts = [math.ceil(g / s) for g, s in zip(grid, tile)]
    out = []
    for tc in itertools.product(*(range(c) for c in counts)):
        members = []
        for off in itertools.product(*(range(s) for s in tile)):
            pos = [tc[a] * tile[a] + off[a] for a in range(3)]
            inside = all(pos[a] < grid[a] for a in range(3))
            members.append((pos[0] * grid[1] + pos[1]) * grid[2] + pos[2] if inside else -1)
        out.append((tc, members))
    return out, counts


def ref_window(counts, window):
    m = math.prod(counts)
    coords = list(itertools.product(*(range(c) for c in counts)))
    keep = np.zeros((m, m), dtype=bool)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            ok = True
            for a in range(3):
                half = window[a] // 2
                centre = min(max(qc[a], half), counts[a] - 1 - half)
                ok &= abs(centre - kc[a]) <= half
            keep[i, j] = ok
    return keep


def ref_importance(qm, km, topk, lam):
    """The published importance sampling on tile means [H, M, D] (float64, NaN diagonal and nanmean)."""
    qn = qm / np.linalg.norm(qm, axis=-1, keepdims=True)
    kn = km / np.linalg.norm(km, axis=-1, keepdims=True)
    sim = (np.einsum("hsd,hkd->hsk", qn, kn) + 1) / 2
    uniq = (np.einsum("hsd,hkd->hsk", kn, kn) + 1) / 2
    idx = np.arange(uniq.shape[-1])
    uniq[:, idx, idx] = np.nan
    score = lam * sim - (1 - lam) * np.nanmean(uniq, axis=-2, keepdims=True)
    keep = np.zeros(score.shape, dtype=bool)
    top = np.argsort(-score, axis=-1)[..., :topk]
    np.put_along_axis(keep, top, True, axis=-1)
    return keep, score


def ref_ssta(q, k, v, grid, cfg, n_keys=None):
    """q [Sq, N, D], k, v [Sk, N, D] of one video (video tokens first), float64 numpy. Returns (out [Sq, N, D],
    the video tile mask [N, M, M] the reference chose, the importance scores)."""
    tile, window, topk = geometry.effective(grid, tuple(cfg.tile_size), tuple(cfg.win_size), cfg.ssta_topk)
    n_keys = k.shape[0] if n_keys is None else n_keys
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    k, v = k[:n_keys], v[:n_keys]
    t = math.prod(grid)
    tiles, counts = ref_tiles(grid, tile)
    heads, d = q.shape[1:]

    def gather(x, members):  # zero rows for padding
        return np.stack([x[i] if i >= 0 else np.zeros((heads, d)) for i in members])

    qm = np.stack([gather(q, mem).mean(0) for _, mem in tiles], 1)  # [H, M, D]
    km = np.stack([gather(k, mem).mean(0) for _, mem in tiles], 1)
    chosen, score = ref_importance(qm, km, min(topk, len(tiles)), cfg.ssta_lambda)
    video_mask = chosen | ref_window(counts, window)[None]
    # keys: every tile's positions (zero-padded ones as zero keys/values), then the context keys
    key_rows = [(j, i) for j, (_, mem) in enumerate(tiles) for i in mem]
    ctx_keys = list(range(t, n_keys))
    out = np.zeros(q.shape)
    tile_of = {i: j for j, (_, mem) in enumerate(tiles) for i in mem if i >= 0}
    for h in range(heads):
        kk = np.stack([k[i, h] if i >= 0 else np.zeros(d) for _, i in key_rows] + [k[i, h] for i in ctx_keys])
        vv = np.stack([v[i, h] if i >= 0 else np.zeros(d) for _, i in key_rows] + [v[i, h] for i in ctx_keys])
        tile_col = np.array([j for j, _ in key_rows] + [-1] * len(ctx_keys))
        for row in range(q.shape[0]):
            if row < t:
                allowed = np.where(tile_col >= 0, video_mask[h, tile_of[row]][np.maximum(tile_col, 0)], True)
            else:
                allowed = np.ones(len(tile_col), dtype=bool)
            s = kk[allowed] @ q[row, h] / math.sqrt(d)
            p = np.exp(s - s.max())
            out[row, h] = (p / p.sum()) @ vv[allowed]
    return out, video_mask, score


def inputs(grid, heads=2, d=16, joint_q=5, joint_k=5, batch=2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    t = math.prod(grid)
    q = torch.randn(batch, t + joint_q, heads, d, generator=gen)
    k = torch.randn(batch, t + joint_k, heads, d, generator=gen) + torch.randn(d, generator=gen)  # shared offset
    v = torch.randn(batch, t + joint_k, heads, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def margin_ok(score, topk):
    """The k-th and (k+1)-th importances of every row differ by more than float32 rounding could move them."""
    s = np.sort(score, axis=-1)[..., ::-1]
    return topk >= s.shape[-1] or np.min(s[..., topk - 1] - s[..., topk]) > 1e-5


# ---- tests --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("counts,window", [((3, 4, 5), (3, 3, 3)), ((1, 2, 6), (3, 3, 5)), ((4, 1, 1), (1, 1, 1))])
def test_window_mask_matches_the_published_clamp(counts, window):
    assert np.array_equal(geometry.window_mask(counts, window), ref_window(counts, window))


def test_tiling_round_trips_and_pads_with_zeros():
    grid, tile = (3, 5, 6), (2, 4, 4)
    x = torch.randn(2, math.prod(grid) + 7, 3, 8)  # 7 context tokens after the video
    tiled = ssta.tile_tokens(x, grid, tile)
    tiles, _ = ref_tiles(grid, tile)
    order = [i for _, mem in tiles for i in mem]
    assert tiled.shape[1] == len(order) + 7
    for pos, i in enumerate(order):
        expected = x[:, i] if i >= 0 else torch.zeros_like(x[:, 0])
        assert torch.equal(tiled[:, pos], expected)
    assert torch.equal(tiled[:, len(order):], x[:, math.prod(grid):])
    assert torch.equal(ssta.untile_tokens(tiled, grid, tile), x)


def test_tile_selection_matches_importance_sampling():
    gen = torch.Generator().manual_seed(1)
    qm, km = torch.randn(12, 3, 16, generator=gen), torch.randn(12, 3, 16, generator=gen) + 0.5
    for topk in (1, 4, 12, 20):
        mask = ssta.select_tiles(qm, km, topk, 0.7)
        ref, score = ref_importance(qm.double().transpose(0, 1).numpy(), km.double().transpose(0, 1).numpy(),
                                    min(topk, 12), 0.7)
        assert margin_ok(score, min(topk, 12))
        assert np.array_equal(mask.numpy(), ref)


@pytest.mark.parametrize("grid,cfg", [
    ((3, 5, 6), config()),  # padding along every axis; 3 latent frames: top-k halved to 2
    ((4, 4, 8), config(tile=(2, 4, 4), win=(3, 1, 3), topk=64)),  # whole tiles; top-k beyond the tiles: all
    ((1, 6, 9), config(tile=(2, 2, 4), win=(3, 3, 3), topk=3)),  # one frame: (1, 4, 4) tiles, window (1, 1, 1)
])
def test_ssta_matches_the_published_forward_in_float64(grid, cfg):
    q, k, v = inputs(grid)
    lengths = [k.shape[1], k.shape[1] - 2]  # the second video has two fewer valid context keys
    out = ssta.ssta_attention(q, k, v, grid, cfg, key_lengths=lengths, use_kernel=False)
    for b in range(q.shape[0]):
        ref, _mask, score = ref_ssta(q[b], k[b], v[b], grid, cfg, lengths[b])
        topk = geometry.effective(grid, cfg.tile_size, cfg.win_size, cfg.ssta_topk)[2]
        assert margin_ok(score, min(topk, score.shape[-1]))
        assert np.abs(out[b].double().numpy() - ref).max() < 2e-5


def test_a_window_and_topk_covering_everything_is_dense_attention_over_the_padded_tiles():
    grid = (2, 4, 4)  # whole tiles: nothing padded, so dense attention over video + context is the reference
    q, k, v = inputs(grid, joint_q=3, joint_k=3)
    out = ssta.ssta_attention(q, k, v, grid, config(tile=(2, 2, 2), win=(3, 3, 3), topk=8), use_kernel=False)
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert (out - dense).abs().max() < 2e-5


@needs_kernel
def test_kernel_splits_tiles_into_power_of_two_blocks():
    grid, cfg = (3, 5, 6), config(tile=(3, 4, 4), win=(1, 3, 3), topk=3)  # 48-token tiles: blocks of 16, three each
    assert geometry.kernel_block(48) == 16
    q, k, v = inputs(grid, joint_q=21, joint_k=19)  # context tails inside a tile's last block
    ref = ssta.ssta_attention(q, k, v, grid, cfg, key_lengths=[k.shape[1], k.shape[1] - 5], use_kernel=False)
    out = ssta.ssta_attention(q, k, v, grid, cfg, key_lengths=[k.shape[1], k.shape[1] - 5], use_kernel=True)
    assert (out - ref).abs().max() < 2e-5


def test_quantised_block_sparse_mode_within_its_bound():
    grid, cfg = (3, 8, 8), config(tile=(2, 4, 4), win=(1, 3, 3), topk=2)
    q, k, v = inputs(grid, d=32, batch=1)
    out = ssta.ssta_attention(q, k, v, grid, cfg, quantized="SAGE_ATTN_2_8_16", use_kernel=False)
    ref, _, _ = ref_ssta(q[0], k[0], v[0], grid, cfg)
    err = np.linalg.norm(out[0].double().numpy() - ref) / np.linalg.norm(ref)
    assert err < 0.03


def test_kernel_layout_drops_blocks_past_the_sequences():
    mask = torch.ones(1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1] = False
    layout = ssta.kernel_layout(mask, 48, queries=48 * 2 + 20, keys=48 * 2 + 3)  # blocks of 16: 8 rows, 7 columns
    assert layout.block_size == 16 and layout.shape == (8, 7)
    assert layout.counts[0].tolist() == [4, 4, 4, 7, 7, 7, 7, 7]
    assert layout.indices[0, 0, :4].tolist() == [0, 1, 2, 6]
    assert layout.indices[0, 3, :7].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_density_bounds_and_settings():
    sta, upper = geometry.density_bounds((31, 45, 80), (6, 8, 8), (3, 3, 3), 64)  # 720p, 121 frames
    assert geometry.tile_grid((31, 45, 80), (6, 8, 8)) == (6, 6, 10)
    assert 0 < sta < upper < 0.2  # 27 window tiles at most + 32 top-k (halved) of 360
    assert geometry.problems((6, 8, 8), (3, 3, 3), 64, frames=31) == []
    assert geometry.problems((3, 5, 5), (3, 3, 3), 64, frames=31)  # 75 tokens: no power-of-two block
    assert geometry.problems((6, 8, 8), (2, 3, 3), 64, frames=31)  # even window
    assert geometry.problems((2, 4, 4), (3, 3, 3), 64, frames=1)  # no published one-frame tile of 32
