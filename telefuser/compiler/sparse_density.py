"""The block masks' density, computed without torch (the compiler never imports torch or ops): the same rules as
`telefuser.ops.sparse_attention.radial_block_mask` / `local_block_mask` in numpy (tests/test_skip_work_plan.py
checks the masks equal ops' over several grids). Read ops' module docstring for the rules and their sources."""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np

Grid = tuple[int, int, int]


def _bitlen(x: int) -> int:
    return int(x).bit_length()


def _window(dist: int, t: int, bs: int, decay_factor: float) -> float:
    if dist == 0:
        return t
    if dist == 1:
        return t // 2
    return max(2 ** _bitlen(t) / 2 ** _bitlen(dist) * decay_factor, bs)


def _frame_kept(dist: int, t: int, bs: int) -> bool:
    decay = 2 ** _bitlen(t) / 2 ** _bitlen(dist)
    return decay >= bs or dist % int(bs / decay) == 0


def _pair_blocks(i: int, j: int, t: int, bs: int, decay_factor: float) -> Optional[np.ndarray]:
    dist, sink = abs(i - j), j == 0
    if not sink and not _frame_kept(dist, t, bs):
        return None
    nb = -(-t // bs)
    rr, rc = (i * t) % bs, (j * t) % bs
    a = np.arange(nb)
    lo = np.clip(a * bs - rr, 0, t)
    hi = np.clip((a + 1) * bs - rr, 0, t)
    c = np.arange(t)
    if sink:
        counts = np.broadcast_to((hi - lo)[:, None], (nb, t))
    else:
        w = math.floor(_window(dist, t, bs, decay_factor))
        top = np.minimum(hi[:, None] - 1, c[None, :] + w)
        bottom = np.maximum(lo[:, None], c[None, :] - w)
        counts = np.clip(top - bottom + 1, 0, None)
    padded = np.zeros((nb, rc + nb * bs), dtype=np.int64)
    padded[:, rc: rc + t] = counts
    per_col = padded[:, : nb * bs].reshape(nb, nb, bs)
    nonzero = (per_col > 0).sum(-1)
    high = (3 * per_col > bs).sum(-1)
    return 5 * high > 3 * nonzero


@functools.lru_cache(maxsize=16)
def radial_mask(grid: Grid, block_size: int, decay_factor: float) -> np.ndarray:
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


@functools.lru_cache(maxsize=16)
def local_mask(grid: Grid, block_size: int, radius: int) -> np.ndarray:
    """A block pair is kept when some query token of the one and key token of the other are within `radius` tokens
    along each axis: the query block's boxes, grown by the radius, meet one of the key block's boxes."""
    f, h, w = grid
    s = f * h * w
    m = -(-s // block_size)
    boxes = np.full((m, 5, 6), -1, dtype=np.int64)
    valid = np.zeros((m, 5), dtype=bool)
    for b in range(m):
        for n, box in enumerate(_boxes(b * block_size, min(s, (b + 1) * block_size), h, w)):
            boxes[b, n], valid[b, n] = box, True
    q, k = boxes[:, None, :, None, :], boxes[None, :, None, :, :]
    meet = valid[:, None, :, None] & valid[None, :, None, :]
    for axis in range(3):
        lo, hi = 2 * axis, 2 * axis + 1
        meet &= (q[..., lo] - radius <= k[..., hi]) & (k[..., lo] <= q[..., hi] + radius)
    return meet.any(axis=(2, 3))


def block_mask(sparse_impl: str, grid: Grid, block_size: int, decay_factor: float, local_window_size: int) -> np.ndarray:
    grid = tuple(int(x) for x in grid)  # type: ignore[assignment]
    if sparse_impl == "radial":
        return radial_mask(grid, int(block_size), float(decay_factor))
    if sparse_impl == "local":
        return local_mask(grid, int(block_size), int(local_window_size))
    raise ValueError(f"no block mask for sparse_impl {sparse_impl!r}")


def density(mask: np.ndarray) -> float:
    """Fraction of the block pairs computed (as ops' `density`)."""
    return float(mask.mean()) if mask.size else 0.0
