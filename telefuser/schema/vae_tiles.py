"""How a tiled HunyuanVideo-1.5 VAE decode batches frames: shared by the model (its `decode_tile`) and the
compiler's memory estimate, so the estimate counts the frames the decode holds."""

from __future__ import annotations

# Latent pixels per decoder call in a tiled decode: 4 frames of a 16 x 16 tile (about 0.6 of a 480p latent frame).
# One frame of a 16 x 16 tile per call is too little work to fill a GPU (a tiled 480p decode frame by frame took
# 1.48x diffusers' time on an H200); this keeps a tile's activations below the whole-frame decode's.
HY15_TILE_CALL_LATENT_PIXELS = 1024


def hy15_frames_per_tile_call(tile_h: int, tile_w: int) -> int:
    return max(1, HY15_TILE_CALL_LATENT_PIXELS // (tile_h * tile_w))
