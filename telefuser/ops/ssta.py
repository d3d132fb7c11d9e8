"""HunyuanVideo-1.5's SSTA (selective and sliding tile attention) over [video, context] tokens, run by our
block-sparse kernels (the 16-bit one, or the quantised one's block-sparse mode); the rule and its source are in
`telefuser.schema.ssta`.

Per video of the batch and per call (the tiles chosen depend on the queries and keys):
1. the video tokens are zero-padded to whole tiles and reordered tile by tile, context tokens after them
   (`tile_tokens`); padded tokens are zero queries, keys and values, as in the published code, so they weigh in the
   softmax of the tiles holding them;
2. each head chooses its top-k tiles by importance from the tiles' mean queries and keys (`select_tiles`), which
   join the sliding window's tiles; context tokens attend to everything and are attended by everything;
3. the tile-level layout is split into the kernel's power-of-two blocks (`kernel_layout`: a 384-token tile is
   three blocks of 128), and one block-sparse call attends [tiled video, context] queries over [tiled video,
   context] keys; the video rows go back to token order (`untile_tokens`).

Context keys are the valid ones only (the caller drops padding, as in dense attention). The published
flex-block-attn masks context at the granularity of its 384-token blocks, so there a query also attends to the
padding tokens that share a block with the last valid context token; here it does not.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch

from telefuser.schema import ssta as geometry
from telefuser.schema.ssta import Triple

from .sparse_attention import BlockLayout, layout_from_mask, sparse_attention, use_dense


@functools.lru_cache(maxsize=32)
def _rows(grid: Triple, tile: Triple, device: str) -> torch.Tensor:
    """Each video token's row in the tiled sequence: [T] int64, the tokens in (t, h, w) order."""
    tiles = geometry.tile_grid(grid, tile)
    rows = torch.arange(math.prod(tiles) * math.prod(tile)).view(*tiles, *tile).permute(0, 3, 1, 4, 2, 5)
    rows = rows.reshape(*(n * s for n, s in zip(tiles, tile)))[: grid[0], : grid[1], : grid[2]]
    return rows.flatten().to(device)


def tile_tokens(x: torch.Tensor, grid: Triple, tile: Triple) -> torch.Tensor:
    """x [B, S, N, D] whose first T = prod(grid) tokens are the video's, in (t, h, w) order -> [B, M * V + S - T,
    N, D]: the video tile by tile (M tiles of V tokens, tiles and the tokens inside one in (t, h, w) order; the grid
    zero-padded to whole tiles), then the other S - T tokens as they were. One scatter, no intermediate copy."""
    t, tiled = math.prod(grid), math.prod(geometry.tile_grid(grid, tile)) * math.prod(tile)
    out = x.new_zeros(x.shape[0], tiled + x.shape[1] - t, *x.shape[2:])
    out.index_copy_(1, _rows(grid, tile, str(x.device)), x[:, :t])
    out[:, tiled:] = x[:, t:]
    return out


def untile_tokens(x: torch.Tensor, grid: Triple, tile: Triple) -> torch.Tensor:
    """The inverse of `tile_tokens`: [B, M * V + R, N, D] -> [B, T + R, N, D], the padding dropped."""
    t, tiled = math.prod(grid), math.prod(geometry.tile_grid(grid, tile)) * math.prod(tile)
    out = x.new_empty(x.shape[0], t + x.shape[1] - tiled, *x.shape[2:])
    out[:, :t] = x.index_select(1, _rows(grid, tile, str(x.device)))
    out[:, t:] = x[:, tiled:]
    return out


def select_tiles(q_tiles: torch.Tensor, k_tiles: torch.Tensor, topk: int, lambda_: float) -> torch.Tensor:
    """Each head's top-k key tiles per query tile by importance: [N, M, M] bool from the tiles' mean queries and
    keys [M, N, D]. In float32 over unit vectors: similarity s(i, j) = (1 + q_i . k_j) / 2, redundancy r(j) = the
    mean over the other tiles l of (1 + k_l . k_j) / 2, importance = lambda * s - (1 - lambda) * r (the published
    importance sampling, with its threshold 0)."""
    q = q_tiles.float().transpose(0, 1)  # [N, M, D]
    k = k_tiles.float().transpose(0, 1)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    heads, m = q.shape[:2]
    mask = torch.zeros(heads, m, m, dtype=torch.bool, device=q.device)
    topk = min(topk, m)
    if topk == 0:
        return mask
    similarity = (q @ k.transpose(1, 2) + 1.0) / 2.0
    overlap = (k @ k.transpose(1, 2) + 1.0) / 2.0
    others = overlap.sum(1) - overlap.diagonal(dim1=1, dim2=2)  # [N, M]: key tile j's overlap with the others
    redundancy = others / (m - 1) if m > 1 else torch.zeros_like(others)
    importance = lambda_ * similarity - (1.0 - lambda_) * redundancy[:, None, :]
    return mask.scatter_(-1, importance.topk(topk, dim=-1, sorted=False).indices, True)


def tile_mask(q_tiled: torch.Tensor, k_tiled: torch.Tensor, tiles: Triple, window: Triple, topk: int,
              lambda_: float, joint_q_tiles: int, joint_k_tiles: int) -> torch.Tensor:
    """The tile-level mask [N, M + Jq, M + Jk] of one video: q_tiled, k_tiled [M * V, N, D] (tiled, padded), the
    window and the top-k tiles among the M video tiles, then Jq / Jk tiles of context queries / keys, all-to-all."""
    m = math.prod(tiles)
    heads, d = q_tiled.shape[1:]
    # the tiles' means in the model dtype, as the published code takes them (float32 from there)
    means = [t.view(m, -1, heads, d).mean(1) for t in (q_tiled, k_tiled)]
    video = select_tiles(*means, topk, lambda_)
    video |= _window(tiles, window, str(video.device))
    mask = torch.ones(heads, m + joint_q_tiles, m + joint_k_tiles, dtype=torch.bool, device=video.device)
    mask[:, :m, :m] = video
    return mask


@functools.lru_cache(maxsize=32)
def _window(tiles: Triple, window: Triple, device: str) -> torch.Tensor:
    return torch.from_numpy(geometry.window_mask(tiles, window).copy()).to(device)


def kernel_layout(mask: torch.Tensor, tile_volume: int, queries: int, keys: int) -> BlockLayout:
    """The tile-level mask's layout in the kernel's blocks (`schema.ssta.kernel_block`): each tile row and column
    splits into tile_volume / block blocks; blocks past the sequences' ends (the last context tile's) are dropped.
    Built from the tile-level layout (a sort over tiles, not over blocks)."""
    block = geometry.kernel_block(tile_volume)
    r = tile_volume // block
    tiled = layout_from_mask(mask, tile_volume)
    mq, mk = -(-queries // block), -(-keys // block)
    parts = torch.arange(r, device=mask.device, dtype=torch.int32)
    indices = (tiled.indices[..., None] * r + parts).flatten(-2).repeat_interleave(r, dim=1)[:, :mq]
    counts = (tiled.counts * r).repeat_interleave(r, dim=1)[:, :mq]
    listed = torch.arange(indices.shape[-1], device=mask.device)[None, None, :] < counts[..., None]
    past = listed & (indices >= mk)  # only the last context tile's blocks, the tail of every list
    counts = counts - past.sum(-1, dtype=torch.int32)
    indices = torch.where(past, torch.zeros_like(indices), indices).contiguous()
    return BlockLayout(counts.contiguous(), indices, block, (mq, mk))


def ssta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Triple, config: Any,
                   key_lengths: Optional[list[int]] = None, scale: Optional[float] = None,
                   quantized: Optional[str] = None, use_kernel: Optional[bool] = None) -> torch.Tensor:
    """SSTA over q [B, Sq, N, D] and k, v [B, Sk, N, D] (BSND) whose first T = prod(grid) tokens are the video's
    (t, h, w) token grid and the rest context tokens (queries: any rows, e.g. sequence-parallel padding, which
    attend like context; keys: valid ones). `config`: ssta_topk, ssta_lambda, tile_size, win_size (a
    `SparseAttentionConfig` or any object with them). `key_lengths[b]`: keys of video b (None: all Sk). `quantized`:
    a SAGE_ATTN_* variant (the quantised kernel's block-sparse mode); `use_kernel` as in `sparse_attention`.
    Returns [B, Sq, N, D] in q's dtype."""
    tokens = math.prod(grid)
    if q.shape[1] < tokens or k.shape[1] < tokens:
        raise ValueError(f"SSTA over a grid of {tokens} video tokens got {q.shape[1]} queries and {k.shape[1]} keys: "
                         "a sequence shard (ring attention) cannot take it; use Ulysses (whole sequences per rank)")
    tile, window, topk = geometry.effective(grid, tuple(config.tile_size), tuple(config.win_size),
                                            int(config.ssta_topk))
    tiles, volume = geometry.tile_grid(grid, tile), math.prod(tile)
    tiled = math.prod(tiles) * volume
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        nk = k.shape[1] if key_lengths is None else int(key_lengths[b])
        qa, ka, va = (tile_tokens(t[b: b + 1, :n], grid, tile) for t, n in ((q, q.shape[1]), (k, nk), (v, nk)))
        mask = tile_mask(qa[0, :tiled], ka[0, :tiled], tiles, window, topk, float(config.ssta_lambda),
                         -(-(q.shape[1] - tokens) // volume), -(-(nk - tokens) // volume))
        layout = kernel_layout(mask, volume, qa.shape[1], ka.shape[1])
        attended = sparse_attention(qa, ka, va, layout=layout, scale=scale, use_kernel=use_kernel, quantized=quantized)
        out[b: b + 1] = untile_tokens(attended, grid, tile)
    return out


def planned_ssta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                 scale: Optional[float] = None, quantized: Optional[str] = None) -> Optional[torch.Tensor]:
    """SSTA of q [B, Sq, N, D] over k, v (BSND) under the runtime's `planned_sparse` when its pattern is "ssta" and
    this step and block run sparse; None otherwise (the caller runs dense attention). `attn_mask` [B, 1, 1, Sk] bool
    (the DiT's key mask of a batch whose context lengths differ): a prefix of valid keys per video."""
    from .planned_sparse import current

    planned = current()
    if planned is None or getattr(planned.config, "sparse_impl", None) != "ssta" \
            or use_dense(planned.step_index, planned.layer_index, planned.config):
        return None
    lengths = None
    if attn_mask is not None:
        keys = attn_mask.reshape(attn_mask.shape[0], -1)
        if keys.shape[-1] != k.shape[1] or keys.dtype != torch.bool:
            raise ValueError(f"SSTA takes a bool key mask [B, 1, 1, {k.shape[1]}], got {attn_mask.dtype} "
                             f"{tuple(attn_mask.shape)}")
        lengths = [int(n) for n in keys.sum(-1).tolist()]
    return ssta_attention(q, k, v, planned.grid, planned.config, lengths, scale, quantized, use_kernel=q.is_cuda)
