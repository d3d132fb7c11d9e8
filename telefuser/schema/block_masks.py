"""The block masks of sparse self-attention over video tokens (Radial Attention, a local 3-D window), built once
here in numpy: the compiler records their density (it never imports torch or ops) and `telefuser.ops
.sparse_attention` turns them into the kernel's block layout. One builder, so the density a plan records is the
density the kernel runs.

Tokens are in Wan's (frame, height, width) order over the latent patch grid `grid = (F, H, W)`; a block is
`block_size` consecutive tokens (default 128), so blocks straddle rows and frames as the sequence runs.
Masks are `[M, M]` bool with `M = ceil(F*H*W / block_size)` (the last block ragged), built once per
(grid, pattern) and cached (functools.lru_cache), returned read-only.

Radial mask (Radial Attention, Li et al. 2025, arXiv:2506.19852; the rule as implemented for Wan in
mit-han-lab/radial-attention, radial_attn/attn_mask.py, `gen_log_mask_shrinked` with model_type "wan",
commits 09c88be / a5c638b). For a query frame i and a key frame j at distance d = |i - j|, with
T = tokens per frame and bitlen(x) = Python's int.bit_length:
- j == 0 (the first frame, an attention sink): every token pair;
- otherwise token pairs at in-frame offsets |r - c| <= width(d): width(0) = T (the whole frame),
  width(1) = T // 2, and for d >= 2 width(d) = max(2**bitlen(T) / 2**bitlen(d) * decay_factor, block_size),
  a band that halves each time the distance doubles (`decay_factor` scales it);
- and, for d >= 1, only frames where d % split(d) == 0, split(d) = int(block_size / L(d)) when
  L(d) = 2**bitlen(T) / 2**bitlen(d) is below block_size (the repository hard-codes 128 "equal to block-size";
  here it is block_size: the same at the default). Far frames are thus also subsampled in time.
Each frame pair's token mask is turned into blocks as the repository does (`shrinkMaskStrict`): the pair's
T x T mask is placed at its offsets inside whole blocks ((i*T) % block_size rows, (j*T) % block_size columns
in), cut to ceil(T / block_size) blocks each way (so a frame's last rows/columns spilling into one more block
give that block nothing from this pair, as there), and a block is kept when more than 60% of its columns that
hold any pair have a density (pairs / block_size) above 1/3; the pairs' blocks are OR-ed. One difference:
the repository's mask has floor(S / 128) blocks (its last, ragged block stays dense, outside the mask);
here the ragged last block is computed by the same rule.

Local mask: a key token is in a query token's window when it lies within `local_window_size` tokens per
side along each of the three axes (frame, height, width) of the token grid; a block pair is kept when any
of its token pairs is in a window (so the block mask is symmetric).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np

Grid = tuple[int, int, int]
_QUERY_CHUNK = 256  # query blocks per pass of the local mask: bounds its [chunk, M, 5, 5] temporaries


def _bitlen(x: int) -> int:
    return int(x).bit_length()


def radial_window(dist: int, tokens_per_frame: int, block_size: int, decay_factor: float) -> float:
    """In-frame band half-width of a frame pair at temporal distance `dist` (Radial Attention, Wan)."""
    if dist == 0:
        return tokens_per_frame
    if dist == 1:
        return tokens_per_frame // 2
    return max(2 ** _bitlen(tokens_per_frame) / 2 ** _bitlen(dist) * decay_factor, block_size)


def radial_frame_kept(dist: int, tokens_per_frame: int, block_size: int) -> bool:
    """Whether a frame pair at distance `dist` is kept by the temporal subsampling of far frames."""
    decay = 2 ** _bitlen(tokens_per_frame) / 2 ** _bitlen(dist)
    return decay >= block_size or dist % int(block_size / decay) == 0


def _pair_blocks(i: int, j: int, t: int, bs: int, decay_factor: float) -> Optional[np.ndarray]:
    """The [nb, nb] block mask one frame pair contributes (nb = ceil(T / bs) blocks from the pair's first
    block row/column), or None when the pair holds no token pair."""
    dist, sink = abs(i - j), j == 0
    if not sink and not radial_frame_kept(dist, t, bs):
        return None
    nb = -(-t // bs)
    rr, rc = (i * t) % bs, (j * t) % bs
    # rows of the frame inside padded block a: [a*bs, (a+1)*bs) ∩ [rr, rr + t), shifted to frame rows
    a = np.arange(nb)
    lo = np.clip(a * bs - rr, 0, t)
    hi = np.clip((a + 1) * bs - rr, 0, t)
    c = np.arange(t)
    if sink:
        counts = np.broadcast_to((hi - lo)[:, None], (nb, t))
    else:
        w = math.floor(radial_window(dist, t, bs, decay_factor))
        top = np.minimum(hi[:, None] - 1, c[None, :] + w)
        bottom = np.maximum(lo[:, None], c[None, :] - w)
        counts = np.clip(top - bottom + 1, 0, None)  # [nb, t]: pairs per (block row, frame column)
    padded = np.zeros((nb, rc + nb * bs), dtype=np.int64)
    padded[:, rc: rc + t] = counts
    per_col = padded[:, : nb * bs].reshape(nb, nb, bs)  # cut to nb column blocks, as the reference does
    nonzero = (per_col > 0).sum(-1)
    high = (3 * per_col > bs).sum(-1)  # density count / bs > 1/3
    return 5 * high > 3 * nonzero  # more than 60% of the non-empty columns (none: not kept)


@functools.lru_cache(maxsize=32)
def _radial(grid: Grid, block_size: int, decay_factor: float) -> np.ndarray:
    f, h, w = grid
    t = h * w
    m = -(-f * t // block_size)
    mask = np.zeros((m, m), dtype=bool)
    for i in range(f):
        for j in range(f):
            blocks = _pair_blocks(i, j, t, block_size, decay_factor)
            if blocks is None:
                continue
            r0, c0 = (i * t) // block_size, (j * t) // block_size
            rows, cols = min(blocks.shape[0], m - r0), min(blocks.shape[1], m - c0)
            mask[r0: r0 + rows, c0: c0 + cols] |= blocks[:rows, :cols]
    mask.flags.writeable = False  # shared through the cache
    return mask


def _boxes(start: int, end: int, h: int, w: int) -> list[tuple[int, int, int, int, int, int]]:
    """The tokens [start, end) of a raster (frame, height, width) order as at most 5 boxes (inclusive bounds)."""
    out, t, s = [], h * w, start
    while s < end:
        f, r = divmod(s, t)
        y, x = divmod(r, w)
        if x != 0 or end - s < w:  # a partial row
            stop = min(end, s - x + w)
            out.append((f, f, y, y, x, x + stop - s - 1))
            s = stop
        elif y != 0 or end - s < t:  # whole rows of one frame
            rows = min((end - s) // w, h - y)
            out.append((f, f, y, y + rows - 1, 0, w - 1))
            s += rows * w
        else:  # whole frames
            frames = (end - s) // t
            out.append((f, f + frames - 1, 0, h - 1, 0, w - 1))
            s += frames * t
    return out


@functools.lru_cache(maxsize=32)
def _local(grid: Grid, block_size: int, radius: int) -> np.ndarray:
    """A block pair is kept when some query token of the one and key token of the other are within `radius` tokens
    along each axis: one of the query block's boxes, grown by the radius, meets one of the key block's boxes."""
    f, h, w = grid
    s = f * h * w
    m = -(-s // block_size)
    boxes = np.full((m, 5, 6), -1, dtype=np.int64)
    valid = np.zeros((m, 5), dtype=bool)
    for b in range(m):
        for n, box in enumerate(_boxes(b * block_size, min(s, (b + 1) * block_size), h, w)):
            boxes[b, n], valid[b, n] = box, True
    mask = np.zeros((m, m), dtype=bool)
    k = boxes[None, :, None, :, :]
    for start in range(0, m, _QUERY_CHUNK):
        rows = slice(start, min(start + _QUERY_CHUNK, m))
        q = boxes[rows, None, :, None, :]
        meet = valid[rows, None, :, None] & valid[None, :, None, :]
        for axis in range(3):
            lo, hi = 2 * axis, 2 * axis + 1
            meet &= (q[..., lo] - radius <= k[..., hi]) & (k[..., lo] <= q[..., hi] + radius)
        mask[rows] = meet.any(axis=(2, 3))
    mask.flags.writeable = False
    return mask


def _check_grid(grid: Grid, block_size: int) -> Grid:
    if len(grid) != 3 or any(int(x) < 1 for x in grid):
        raise ValueError(f"grid is the (frames, height, width) of the token grid, got {grid}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two of at least 16, got {block_size}")
    return tuple(int(x) for x in grid)  # type: ignore[return-value]


def radial_mask(grid: Grid, block_size: int = 128, decay_factor: float = 1.0) -> np.ndarray:
    """The Radial Attention block mask [M, M] over a (frames, height, width) token grid (cached, read-only)."""
    grid = _check_grid(grid, int(block_size))
    if not 0 < decay_factor <= 1:
        raise ValueError(f"decay_factor must be in (0, 1], got {decay_factor}")
    return _radial(grid, int(block_size), float(decay_factor))


def local_mask(grid: Grid, block_size: int = 128, local_window_size: int = 6) -> np.ndarray:
    """The local-window block mask [M, M]: `local_window_size` tokens per side along frame, height and width
    (cached, read-only)."""
    grid = _check_grid(grid, int(block_size))
    if local_window_size < 1:
        raise ValueError(f"the local pattern needs local_window_size >= 1 token per side, got {local_window_size}")
    return _local(grid, int(block_size), int(local_window_size))


def block_mask(sparse_impl: Optional[str], grid: Grid, block_size: int = 128, decay_factor: float = 1.0,
               local_window_size: int = 0) -> np.ndarray:
    """The block mask of a sparse pattern: "radial" (`decay_factor`) or "local" (`local_window_size`)."""
    if sparse_impl == "radial":
        return radial_mask(grid, block_size, decay_factor)
    if sparse_impl == "local":
        return local_mask(grid, block_size, local_window_size)
    raise ValueError(f"no block mask for sparse_impl {sparse_impl!r}: this build makes 'radial' and 'local'")


def density(mask: np.ndarray) -> float:
    """Fraction of the block pairs a block mask computes (1.0 = dense). Over blocks, so a ragged last block
    counts as a whole one."""
    return float(np.mean(mask)) if np.size(mask) else 0.0
