"""The geometry of HunyuanVideo-1.5's SSTA (selective and sliding tile attention), in numpy: the compiler records
its density and checks its settings with these (it never imports torch), and `telefuser.ops.ssta` runs it.

SSTA as Tencent's pipeline runs it (HunyuanVideo-1.5 `hyvideo/models/transformers/modules/ssta_attention.py`,
`attn_mode = "flex-block-attn"`, `attn_sparse_type = "ssta"`, the transformer's default `attn_param`, which the
released sparse checkpoints use):

- the video tokens' (t, h, w) grid is zero-padded to whole tiles of `tile_size` (6, 8, 8) = 384 tokens, and the
  tokens are reordered tile by tile, so each tile is one block of the block-sparse attention;
- a query tile attends to (1) the STA window: the `win_size` (3, 3, 3) tiles around it, the window's centre clamped
  so that it stays inside the tile grid near the edges, (2) the `ssta_topk` (64) tiles of the highest importance,
  chosen per head from the tiles' mean queries and keys (`telefuser.ops.ssta.select_tiles`), and (3) every
  context (text, glyph, image) token; context tokens attend to every token;
- on a single frame (t = 1) the tile becomes a one-frame tile of the same size ((1, 16, 24) for 384 tokens) and the
  window (1, 1, 1); for at most 31 latent frames (121 video frames at 16 fps and less) `ssta_topk` is halved.
"""

from __future__ import annotations

import functools
import math

import numpy as np

Triple = tuple[int, int, int]

TILE_SIZE: Triple = (6, 8, 8)  # the released attn_param's tile_size
WIN_SIZE: Triple = (3, 3, 3)  # win_size
TOPK = 64  # ssta_topk
LAMBDA = 0.7  # ssta_lambda (importance sampling's weight of similarity against redundancy)
SHORT_VIDEO_FRAMES = 31  # latent frames up to which ssta_topk is halved (5 s at 24 fps: 5 * 24 / 4 + 1)
# One-frame tiles by tile volume (the published table; other volumes have none).
IMAGE_TILES: dict[int, Triple] = {384: (1, 16, 24), 128: (1, 16, 8), 64: (1, 8, 8), 16: (1, 4, 4)}
KERNEL_BLOCK_MAX = 128  # the block-sparse kernels' best block (their query and key tiles are at most this)


def effective(grid: Triple, tile: Triple, window: Triple, topk: int) -> tuple[Triple, Triple, int]:
    """(tile, window, topk) SSTA uses over a video token grid (t, h, w): one-frame tiles and window for t = 1, half
    the top-k for short videos (see the module)."""
    if grid[0] == 1:
        return IMAGE_TILES[int(np.prod(tile))], (1, 1, 1), topk
    return tile, window, topk // 2 if grid[0] <= SHORT_VIDEO_FRAMES else topk


def tile_grid(grid: Triple, tile: Triple) -> Triple:
    """Tiles along (t, h, w) after padding the grid to whole tiles."""
    return tuple(-(-g // s) for g, s in zip(grid, tile))  # type: ignore[return-value]


def kernel_block(tile_volume: int) -> int:
    """The block size the block-sparse kernel runs an SSTA tile in: the largest power of two dividing the tile's
    volume, at most 128 (a 384-token tile is three blocks of 128); the kernels need a power of two."""
    return min(tile_volume & -tile_volume, KERNEL_BLOCK_MAX)


def _centre(index: np.ndarray, half: int, count: int) -> np.ndarray:
    """The window's centre tile: the query tile, clamped to [half, count - 1 - half] (a window wider than the grid:
    count - 1 - half, as the published clip does when its bounds cross)."""
    return np.minimum(np.maximum(index, half), count - 1 - half)


@functools.lru_cache(maxsize=32)
def _window(tiles: Triple, window: Triple) -> np.ndarray:
    coords = np.stack(np.meshgrid(*(np.arange(n) for n in tiles), indexing="ij"), -1).reshape(-1, 3)  # [M, 3]
    keep = np.ones((len(coords), len(coords)), dtype=bool)
    for axis in range(3):
        half = window[axis] // 2
        centre = _centre(coords[:, axis], half, tiles[axis])
        keep &= np.abs(centre[:, None] - coords[None, :, axis]) <= half
    keep.flags.writeable = False
    return keep


def window_mask(tiles: Triple, window: Triple) -> np.ndarray:
    """The STA window over a grid of tiles: [M, M] bool, M = prod(tiles), tiles in (t, h, w) order (cached,
    read-only)."""
    return _window(tuple(int(n) for n in tiles), tuple(int(w) for w in window))  # type: ignore[arg-type]


def density_bounds(grid: Triple, tile: Triple, window: Triple, topk: int) -> tuple[float, float]:
    """(the STA window's share, an upper bound with the top-k) of the video tiles' block pairs at this grid: what a
    plan can say before the queries exist (the top-k tiles may fall inside the window, hence a bound)."""
    tile, window, topk = effective(grid, tile, window, topk)
    sta = window_mask(tile_grid(grid, tile), window)
    m = sta.shape[0]
    upper = np.minimum(sta.sum(-1) + min(topk, m), m).sum() / (m * m)
    return float(sta.mean()), float(upper)


def problems(tile: Triple, window: Triple, topk: int, frames: int, quantised_min_block: int = 0) -> list[str]:
    """Why these SSTA settings cannot run (empty when they can); `frames`: the plan's latent frames (1: the
    one-frame tiles), `quantised_min_block`: the quantised kernel's least block (0: the 16-bit kernel)."""
    out = []
    volume = math.prod(tile)
    if any(int(s) < 1 for s in tile) or any(int(w) < 1 or int(w) % 2 == 0 for w in window):
        out.append(f"tile_size {list(tile)} needs entries >= 1 and win_size {list(window)} odd entries >= 1 (a window "
                   "centred on its tile)")
    elif kernel_block(volume) < max(16, quantised_min_block):
        out.append(f"tile_size {list(tile)} holds {volume} tokens, and the block-sparse kernel runs tiles in blocks of "
                   f"a power of two dividing them, at least {max(16, quantised_min_block)}; use a tile of 384 "
                   "(6, 8, 8: the released one), 128 or 64 tokens")
    elif frames == 1 and volume not in IMAGE_TILES:
        out.append(f"a one-frame video runs SSTA in one-frame tiles of the same size, published for "
                   f"{sorted(IMAGE_TILES)} tokens only, and tile_size {list(tile)} holds {volume}")
    if topk < 1:
        out.append(f"ssta_topk = {topk}: at least one tile must be selected")
    return out
