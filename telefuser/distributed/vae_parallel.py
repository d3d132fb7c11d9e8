"""VAE decode (Wan2.1's `WanVAE`, Wan2.2's `Wan22VAE`, HunyuanVideo-1.5's `HunyuanVideo15VAE`: any `TiledDecoder`)
split spatially over the ranks of a process group (`enable_vae_parallel`).

The scheme is the VAE's own tiled decode (`vae.decode(z, tiled=True, tile_size=...)`, telefuser.models.wan.causal_vae)
with its tiles shared out:

- Tiles: the grid of the tiled decode. Tile (i, j) covers latent rows i : i + tile[0] and columns
  j : j + tile[1] for i in range(0, H, stride[0]), j in range(0, W, stride[1]), with the tiled decode's
  default stride, tile - tile // 4 (a quarter of each tile overlaps its neighbour). Tiles at the bottom
  and right edges are cut at the latent's border, so they can be smaller.
- Distribution: tiles numbered in row-major order, tile k decoded by group rank k % N (round robin).
  The ranks work in rounds; in round r every rank decodes tile r * N + rank (if there is one) with the
  VAE's per-tile decode (`decode_tile`, the function the tiled decode calls per tile, in the decoder's output
  space: Wan2.2's patches before they are unfolded into pixels) and the round's tiles are gathered to group rank 0, padded to the largest tile's shape so one `dist.gather`
  carries them (a rank without a tile in the last round sends zeros).
- Stitching, on group rank 0 only: the round's tiles are consecutive in row-major order, which is the
  order in which the tiled decode blends, so rank 0 hands each one as soon as it arrives to the tiled
  decode's own `TileStitcher`: top overlap from the blended tile above, then left overlap from the
  blended tile on the left, the top-left `stride` part written into the video, the bottom and right
  strips kept for the next tiles. Rank 0 therefore holds the video, one
  round of N tiles and one row of strips; the other ranks hold one tile at a time and no video.
- Result: bit for bit the single-rank `vae.decode(z, tiled=True, tile_size=tile_size)` (same tiles, same
  per-tile function on the same input, same blend arithmetic in the same order; only copies are added),
  whatever the number of ranks.

`tile_size=None` picks one band per rank (`band_tile_size`): the longer latent side is cut into at most
N bands overlapping by a quarter of a band, the shorter side is one tile. With one rank it is one tile
holding the whole latent, i.e. the untiled decode.

Tiling is not the untiled decode: each tile's convolutions see zeros past the tile's border and the
middle block's attention spans one tile, not the frame, so every pixel changes a little, most near the
seams. tests/test_vae_parallel.py measures that difference on a small VAE.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.distributed as dist

from telefuser.models.wan.causal_vae import TileStitcher, default_tile_stride, tile_grid

# The smallest band with an overlap under the tiled decode's stride rule (tile // 4 >= 1).
MIN_BAND = 4


class TiledDecoder(Protocol):
    """What the tile-parallel decode needs of a VAE (the Wan VAEs' `CausalVideoVAE` and `HunyuanVideo15VAE` have it):
    the decoder's input from the latents, its per-tile output (decoder output space: `decoder_channels` channels,
    `network_ratio` pixels per latent pixel, unfolded into `patch_size`^2 pixels by the stitcher) and the video's
    buffer."""

    network_ratio: int
    patch_size: int
    temporal_ratio: int
    decoder_channels: int

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor: ...

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor: ...

    def video_buffer(self, z: torch.Tensor) -> torch.Tensor: ...


def _single_tile(length: int) -> int:
    """The smallest tile whose stride reaches past `length`: one tile along that side, nothing blended."""
    t = max(1, length)
    while t - t // 4 < length:
        t += 1
    return t


def band_tile_size(height: int, width: int, world_size: int) -> tuple[int, int]:
    """Tile size (latent pixels) giving each of `world_size` ranks at most one band of an h x w latent.

    The longer side (height on a tie) is cut: the band length is the smallest t >= 4 whose grid,
    ceil(L / (t - t // 4)) tiles, has at most `world_size` tiles, so the overlap is t // 4 >= 1 latent
    pixel (8 pixels of video) and the slowest rank decodes the shortest band possible under that rule.
    The last band is the remainder and can be shorter; a latent too short for `world_size` such bands
    gets fewer (the remaining ranks decode nothing). The other side gets one tile holding it whole.
    With one rank both sides are one tile: the untiled decode.
    """
    if height < 1 or width < 1 or world_size < 1:
        raise ValueError(f"band_tile_size needs a positive latent size and rank count, "
                         f"got {height}x{width} and {world_size}")
    if world_size == 1:
        return _single_tile(height), _single_tile(width)
    split_height = height >= width
    length = height if split_height else width
    band = MIN_BAND
    while math.ceil(length / (band - band // 4)) > world_size:
        band += 1
    if split_height:
        return band, _single_tile(width)
    return _single_tile(height), band


def _group_place(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in the group, group size); one rank when no process group exists."""
    if group is None and not dist.is_initialized():
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("parallel_decode was called on a rank that is not a member of `group`")
    return rank, dist.get_world_size(group)


@torch.no_grad()
def parallel_decode(vae: TiledDecoder, z: torch.Tensor, group: dist.ProcessGroup | None,
                    tile_size: tuple[int, int] | None = None) -> torch.Tensor | None:
    """Decode normalised latents [B, z_dim, F, H, W] over the ranks of `group` (None: the default group).

    Every rank of the group must call it with the same `z` (same shape, dtype, device kind) and a VAE
    with the same weights. Returns the video [B, 3, 1 + 4(F - 1), sH, sW] (s: the VAE's spatial ratio) in
    [-1, 1] on the group's rank 0, None on the others; it equals `vae.decode(z, tiled=True, tile_size=tile_size)`
    bit for bit, with `tile_size=None` meaning `band_tile_size(H, W, group size)`. Without an initialised process
    group (and group None) it decodes alone.
    """
    rank, world = _group_place(group)
    height, width = z.shape[3], z.shape[4]
    if tile_size is None:
        tile_size = band_tile_size(height, width, world)
    tile_size = (int(tile_size[0]), int(tile_size[1]))
    if min(tile_size) < 1:
        raise ValueError(f"tile_size {tile_size} must be positive latent pixels (height, width)")
    stride = default_tile_stride(tile_size)
    r = vae.network_ratio

    z = vae.decoder_input(z)  # on every rank (a 1x1x1 convolution: cheap)
    b, frames = z.shape[0], 1 + vae.temporal_ratio * (z.shape[2] - 1)
    corners = [corner for row in tile_grid(height, width, stride) for corner in row]
    # Every gathered tile is padded to the largest one's shape (the first tile's: edge tiles only shrink).
    full = (b, vae.decoder_channels, frames, min(tile_size[0], height) * r, min(tile_size[1], width) * r)

    def tile_shape(k: int) -> tuple[int, int]:
        i, j = corners[k]
        return min(tile_size[0], height - i) * r, min(tile_size[1], width - j) * r

    stitcher = None
    if rank == 0:
        stitcher = TileStitcher(vae.video_buffer(z), (height, width), tile_size, stride, r, vae.patch_size)
    dst = 0 if group is None else dist.get_global_rank(group, 0)

    for first in range(0, len(corners), world):
        k = first + rank
        if k < len(corners):
            i, j = corners[k]
            decoded = vae.decode_tile(z[:, :, :, i : i + tile_size[0], j : j + tile_size[1]])
            if decoded.shape != full:
                padded = decoded.new_zeros(full)
                padded[:, :, :, : decoded.shape[3], : decoded.shape[4]] = decoded
                decoded = padded
        else:
            decoded = z.new_zeros(full)
        if world == 1:
            received = [decoded]
        else:
            received = [torch.empty_like(decoded) for _ in range(world)] if rank == 0 else None
            dist.gather(decoded.contiguous(), received, dst=dst, group=group)
        del decoded
        if stitcher is not None:
            for q, part in enumerate(received):
                if first + q < len(corners):
                    h, w = tile_shape(first + q)
                    stitcher.add(part[:, :, :, :h, :w])
        del received
    if stitcher is None:
        return None
    return stitcher.finish().clamp_(-1.0, 1.0)
