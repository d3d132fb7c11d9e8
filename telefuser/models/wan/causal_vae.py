"""What the two Wan VAEs share: the encoder and decoder assembly, the chunked encode, the decode one latent frame at
a time, the tiled decode and its stitching (also VAE parallel's), and the latent-statistics buffer.

A Wan VAE's network works on a grid `network_ratio` (8) times coarser than its input; Wan2.2's first folds 2x2
pixel blocks into channels (`patch_size` 2: 12 channels at half the resolution) and unfolds them after the decoder,
Wan2.1's works on pixels (`patch_size` 1). Everything below is written for the decoder's output space, `3 * p * p`
channels at `network_ratio` times the latent grid, and puts pixels in place with `place_pixels`.

Time is causal: a video of 1 + 4k frames is encoded as its first frame, then chunks of 4; decoding runs one latent
frame at a time (1 frame out for the first, 4 for each next), as Wan's own code does. Between chunks each causal
convolution keeps its last input frames in a `CausalCache`, so the whole video's activations are never held at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .vae_blocks import CausalCache, CausalConv3d, head_blocks, middle_blocks, run_blocks, run_head


class CausalEncoder(nn.Module):
    """conv1 -> downsample stages -> middle -> head (mean and log-variance: 2 x z_dim channels)."""

    def __init__(self, in_channels: int, dims: Sequence[int], stages: Sequence[nn.Module], z_dim: int) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*stages)
        self.middle = middle_blocks(dims[-1])
        self.head = head_blocks(dims[-1], z_dim * 2)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        return run_head(self.head, run_blocks(self.middle, run_blocks(self.downsamples, x, cache), cache), cache)


class CausalDecoder(nn.Module):
    """conv1 -> middle -> upsample stages -> head (`out_channels`: 3 x patch_size^2)."""

    def __init__(self, z_dim: int, dims: Sequence[int], stages: Sequence[nn.Module], out_channels: int) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        self.upsamples = nn.Sequential(*stages)
        self.head = head_blocks(dims[-1], out_channels)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        return run_head(self.head, run_blocks(self.upsamples, run_blocks(self.middle, x, cache), cache), cache)


def latent_stats(z_dim: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[2, 1, z_dim, 1, 1, 1]: the published per-channel mean and std, or 0 and 1 for a z_dim without published
    statistics (tests, tiny models). Derived from constants, never in a checkpoint: real values even under the meta
    device (the loader builds on meta, assigns the checkpoint's tensors, then moves the model), on the CPU there."""
    on = "cpu" if torch.get_default_device().type == "meta" else None
    stats = torch.tensor([list(mean), list(std)], device=on) if z_dim == len(mean) else \
        torch.stack([torch.zeros(z_dim, device=on), torch.ones(z_dim, device=on)])
    return stats.view(2, 1, z_dim, 1, 1, 1)


def default_tile_stride(tile_size: tuple[int, int]) -> tuple[int, int]:
    """The stride of a tiled decode given none: a quarter of the tile overlaps (32 -> 24 latent pixels, diffusers'
    256/192-pixel default for the Wan2.1 VAE; 16 -> 12 for Wan2.2's)."""
    return (tile_size[0] - tile_size[0] // 4, tile_size[1] - tile_size[1] // 4)


def tile_grid(height: int, width: int, tile_stride: tuple[int, int]) -> list[list[tuple[int, int]]]:
    """Top-left latent corners of the tiled decode's tiles, row by row."""
    return [[(i, j) for j in range(0, width, tile_stride[1])] for i in range(0, height, tile_stride[0])]


def place_pixels(out: torch.Tensor, x: torch.Tensor, p: int) -> None:
    """Write the decoder's output x [B, 3*p*p, F, h, w] into video pixels out [B, 3, F, h*p, w*p] (any strides):
    a copy for p = 1, the inverse of the patchify (channel c*p*p + dw*p + dh) otherwise."""
    if p == 1:
        out.copy_(x)
        return
    c, h, w = out.shape[1], x.shape[3], x.shape[4]
    target = out.unflatten(4, (w, p)).unflatten(3, (h, p))  # b c f h dh w dw
    target.copy_(x.unflatten(1, (c, p, p)).permute(0, 1, 4, 5, 3, 6, 2))  # b c dw dh f h w -> b c f h dh w dw


def blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first `extent` rows/columns of `cur` (in place) from the end of `prev`."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    if extent == 0:
        return
    shape = [1] * cur.ndim
    shape[dim] = extent
    w = (torch.arange(extent, dtype=cur.dtype, device=cur.device) / extent).view(shape)
    head = cur.narrow(dim, 0, extent)
    head.copy_(prev.narrow(dim, prev.shape[dim] - extent, extent) * (1 - w) + head * w)


class TileStitcher:
    """Decoded tiles (decoder output space), given in the grid's row-major order, blended into the video.

    Each tile is blended with its already blended upper neighbour, then its left one, linearly over the overlap;
    its top-left `stride` part is then final and goes straight into the video; only the strips the next tiles
    blend from are kept (one row of bottom strips, one right strip), so memory is bounded by the tile, not the frame.
    """

    def __init__(self, video: torch.Tensor, latent_size: tuple[int, int], tile_size: tuple[int, int],
                 tile_stride: tuple[int, int], network_ratio: int, patch_size: int) -> None:
        self.video = video
        self.height, self.width = latent_size
        grid = tile_grid(self.height, self.width, tile_stride)
        self.corners = [corner for row in grid for corner in row]
        self.columns = len(grid[0])
        self.stride, self.r, self.p = tile_stride, network_ratio, patch_size
        self.overlap = ((tile_size[0] - tile_stride[0]) * network_ratio, (tile_size[1] - tile_stride[1]) * network_ratio)
        self.count = 0
        self.above: list[torch.Tensor] = []  # bottom strips of the previous row's blended tiles
        self.row_bottoms: list[torch.Tensor] = []
        self.left: torch.Tensor | None = None  # right strip of the previous blended tile in this row

    def add(self, decoded: torch.Tensor) -> None:
        i, j = self.corners[self.count]
        column = self.count % self.columns
        self.count += 1
        if column == 0 and self.count > 1:  # a new row of tiles
            self.above, self.row_bottoms, self.left = self.row_bottoms, [], None
        r, p, overlap = self.r, self.p, self.overlap
        if self.above:
            blend(self.above[column], decoded, overlap[0], dim=3)
        if self.left is not None:
            blend(self.left, decoded, overlap[1], dim=4)
        keep_h, keep_w = min(self.stride[0], self.height - i) * r, min(self.stride[1], self.width - j) * r
        region = self.video[:, :, :, i * r * p : (i * r + keep_h) * p, j * r * p : (j * r + keep_w) * p]
        place_pixels(region, decoded[:, :, :, :keep_h, :keep_w], p)
        # clones: a view would keep the whole tile alive
        self.left = decoded[:, :, :, :, decoded.shape[4] - overlap[1]:].clone()
        self.row_bottoms.append(decoded[:, :, :, decoded.shape[3] - overlap[0]:].clone())

    def finish(self) -> torch.Tensor:
        if self.count != len(self.corners):
            raise RuntimeError(f"the tiled decode stitched {self.count} of {len(self.corners)} tiles")
        return self.video


class CausalVideoVAE(nn.Module):
    """A Wan VAE: `encoder`, `conv1` (to mean and log-variance), `conv2` (from the latent), `decoder`, and the
    latent statistics. `encode` returns and `decode` takes *normalised* latents, (z - mean) / std per channel,
    which is what the DiT sees. Subclasses build the stages and give `name`, `patch_size` and the statistics."""

    name = "Wan VAE"
    default_tile_size: tuple[int, int] = (32, 32)

    def __init__(self, config, encoder: nn.Module, decoder: nn.Module, patch_size: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.config = config
        self.patch_size = patch_size
        self.network_ratio = 2 ** (len(config.dim_mult) - 1)  # 8: the network's own spatial compression
        self.spatial_ratio = patch_size * self.network_ratio  # pixels per latent pixel: 8 (Wan2.1), 16 (Wan2.2)
        self.temporal_ratio = 2 ** sum(config.temporal_downsample)  # 4
        self.encoder = encoder
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = decoder
        self.register_buffer("latent_stats", latent_stats(config.z_dim, mean, std), persistent=False)

    @property
    def decoder_channels(self) -> int:
        return 3 * self.patch_size**2

    def network_input(self, video: torch.Tensor) -> torch.Tensor:
        """The encoder's input for video pixels (Wan2.2: patchified)."""
        return video

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latent mean [B, z, 1+k, H/s, W/s] (s: spatial_ratio)."""
        if (video.shape[2] - 1) % self.temporal_ratio:
            raise ValueError(f"the {self.name} encodes 1+{self.temporal_ratio}k frames, got {video.shape[2]}")
        x = self.network_input(video)
        cache = CausalCache()
        # The first frame alone, then chunks of 4 (none for a single image: split() of zero frames gives one
        # empty chunk, which the causal convolution cannot take).
        rest = x[:, :, 1:]
        chunks = [x[:, :, :1]] + (list(rest.split(self.temporal_ratio, dim=2)) if rest.shape[2] else [])
        out = torch.cat([self.encoder(c, cache) for c in chunks], dim=2)
        mean = self.conv1(out).chunk(2, dim=1)[0]
        latent_mean, latent_std = self.latent_stats.to(mean.dtype)
        return (mean - latent_mean) / latent_std

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the decoder's input (un-normalised, through conv2): cheap, once per decode."""
        latent_mean, latent_std = self.latent_stats.to(z.dtype)
        return self.conv2(z * latent_std + latent_mean)

    def video_buffer(self, z: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = z.shape
        return z.new_empty(b, 3, 1 + self.temporal_ratio * (t - 1), h * self.spatial_ratio, w * self.spatial_ratio)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiled: bool = False, tile_size: tuple[int, int] | None = None,
               tile_stride: tuple[int, int] | None = None) -> torch.Tensor:
        """Normalised latents [B, z, T, h, w] -> video [B, 3, 1+4(T-1), s*h, s*w] in [-1, 1].

        Tiled: overlapping spatial tiles of `tile_size` latent pixels (default `default_tile_size`) every
        `tile_stride` (default: a quarter of the tile overlaps), each decoded on its own and blended by
        `TileStitcher` in the decoder's output space; memory is bounded by the tile, not the frame.
        """
        tile_size = tuple(tile_size or self.default_tile_size)
        if tile_stride is None:
            tile_stride = default_tile_stride(tile_size)
        if not all(0 < s <= t for s, t in zip(tile_stride, tile_size)):
            raise ValueError(f"tile_stride {tuple(tile_stride)} must be positive and at most tile_size {tile_size}")
        z = self.decoder_input(z)
        video = self.video_buffer(z)
        if tiled:
            stitcher = TileStitcher(video, (z.shape[3], z.shape[4]), tile_size, tuple(tile_stride),
                                    self.network_ratio, self.patch_size)
            for i, j in stitcher.corners:
                stitcher.add(self.decode_tile(z[:, :, :, i : i + tile_size[0], j : j + tile_size[1]]))
            stitcher.finish()
        else:
            start = 0
            for frames in self._decode_chunks(z):
                place_pixels(video[:, :, start : start + frames.shape[2]], frames, self.patch_size)
                start += frames.shape[2]
        return video.clamp_(-1.0, 1.0)

    def _decode_chunks(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """The decoder's output one latent frame at a time (z: the decoder's input)."""
        cache = CausalCache()
        for i in range(z.shape[2]):
            yield self.decoder(z[:, :, i : i + 1], cache)

    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """The whole decoder output of a (tile of the) decoder input z [B, z, T, h, w], in the decoder's output
        space: [B, 3*p*p, 1+4(T-1), 8h, 8w]. The per-tile function of the tiled decode and of VAE parallel."""
        b, _, t, h, w = z.shape
        r = self.network_ratio
        out = z.new_empty(b, self.decoder_channels, 1 + self.temporal_ratio * (t - 1), h * r, w * r)
        start = 0
        for frames in self._decode_chunks(z):
            out[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
        return out
