"""The Wan VAE decode split over real gloo ranks (telefuser.distributed.vae_parallel) against one rank.

Tolerances, float32:
- against the single-rank *tiled* decode (`vae.decode(z, tiled=True, tile_size=...)`): exact
  (`torch.equal`). The ranks decode the same tiles of the same latent with the same per-tile function,
  and rank 0 blends them with the same arithmetic in the same order; gathering and padding only copy.
- against the single-rank *untiled* decode: no tolerance holds for the whole frame. A tile's
  convolutions see zeros past its border and the middle block's attention spans the tile, not the frame.
  On the small random VAE here the tiled decode differs from the untiled one by up to ~1.9 (the output
  range is 2) in the seams, 0.06-0.07 on average over a 2-band frame and ~0.02-0.03 far from the seams
  (that part is the attention's). Trained weights give much smaller seams, but nothing weight independent
  bounds them below 2. What does hold, and is tested: without the attention (its projection zeroed) a
  pixel whose every covering tile keeps it more than the decoder's receptive-field radius (13.5 latent
  pixels = 108 video pixels with one residual block per level; 17.25 = 138 with Wan2.1's two, measured by
  perturbing one latent pixel) from the tile's cut edges equals the untiled decode up to float32 rounding
  (atol 1e-5; the outputs are O(1)); and with one rank the default tiling is one tile, so the untiled
  decode exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import spawn
from telefuser.distributed.vae_parallel import band_tile_size, parallel_decode
from telefuser.models.wan.causal_vae import default_tile_stride, tile_grid
from telefuser.models.wan.vae import WanVAE, WanVAEConfig
from telefuser.models.wan.vae22 import Wan22VAE, Wan22VAEConfig

CONFIG = WanVAEConfig(z_dim=16, base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
CONFIG_22 = Wan22VAEConfig(z_dim=8, base_dim=8, decoder_base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
HALO = 108  # video pixels: the receptive-field radius of CONFIG's decoder (13.5 latent pixels)
ATOL = 1e-5


def make_vae(attention: bool = True, wan22: bool = False) -> WanVAE | Wan22VAE:
    vae = (Wan22VAE(CONFIG_22) if wan22 else WanVAE(CONFIG)).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            # Random weights kept moderate, so that most outputs stay inside the [-1, 1] clamp.
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            if not attention and name.startswith("decoder.middle.1.proj"):
                p.zero_()  # the attention block adds proj(...) = 0: an identity
    return vae


def latents(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(99))


def far_from_cuts(length: int, tile: int, stride: int, r: int) -> torch.Tensor:
    """Video positions along one side that every covering tile holds more than HALO from its cut edges."""
    ok = torch.ones(length * r, dtype=torch.bool)
    for start in range(0, length, stride):
        end = min(start + tile, length)
        pos = torch.arange(length * r)
        inside = (pos >= start * r) & (pos < end * r)
        near = torch.zeros_like(inside)
        if start > 0:
            near |= pos < start * r + HALO
        if end < length:
            near |= pos >= end * r - HALO
        ok &= ~(inside & near)
    return ok


# --------------------------------------------------------------------------------------------- one process


def test_band_tile_size() -> None:
    assert band_tile_size(12, 14, 1) == (15, 18)  # one tile holding everything: stride >= the side
    for h, w in [(2, 64), (12, 14), (10, 13), (60, 104), (90, 160), (104, 60), (3, 3), (1, 50)]:
        for n in (1, 2, 3, 4, 8):
            tile = band_tile_size(h, w, n)
            stride = default_tile_stride(tile)
            grid = tile_grid(h, w, stride)
            cut = 0 if h >= w else 1
            assert len(grid) * len(grid[0]) <= n
            assert (len(grid), len(grid[0]))[1 - cut] == 1  # one tile across the uncut side
            if n > 1 and (h, w)[cut] >= 4 and len(grid) * len(grid[0]) > 1:
                assert tile[cut] // 4 >= 1  # bands overlap
    # Wan2.1 480p (latent 60x104): vertical bands of 69 / 34 / 17 latent columns for 2 / 4 / 8 ranks.
    assert [band_tile_size(60, 104, n)[1] for n in (2, 4, 8)] == [69, 34, 17]


def test_one_rank_without_process_group() -> None:
    assert not dist.is_initialized()
    vae = make_vae()
    z = latents((1, 16, 2, 6, 7))
    assert torch.equal(parallel_decode(vae, z, None), vae.decode(z))
    assert torch.equal(parallel_decode(vae, z, None, (4, 4)), vae.decode(z, tiled=True, tile_size=(4, 4)))
    with pytest.raises(ValueError, match="tile_size"):
        parallel_decode(vae, z, None, (0, 4))


# --------------------------------------------------------------------------------------------- gloo ranks


def _tiled_worker(shape: tuple[int, ...], tile: tuple[int, int]) -> None:
    vae, z = make_vae(), latents(shape)
    out = parallel_decode(vae, z, None, tile)
    if dist.get_rank() != 0:
        assert out is None
        return
    expected = vae.decode(z, tiled=True, tile_size=tile)
    assert out.shape == expected.shape == (shape[0], 3, 1 + 4 * (shape[2] - 1), 8 * shape[3], 8 * shape[4])
    assert torch.equal(out, expected), (out - expected).abs().max()
    untiled = vae.decode(z)
    print(f"tiled {tile} vs untiled: max {(out - untiled).abs().max():.3f} mean {(out - untiled).abs().mean():.4f}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_decode_matches_tiled_decode(world_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # 12 x 14 latent, tiles of 6 every 5: 3 x 3 = 9 tiles (5 + 4 on 2 ranks, 3 + 2 + 2 + 2 on 4), the last
    # row and column cut to 2 and 4 latent pixels; batch 2, 2 latent frames (5 video frames).
    spawn(functools.partial(_tiled_worker, (2, 16, 2, 12, 14), (6, 6)), world_size, monkeypatch)


def _band_worker(shape: tuple[int, ...]) -> None:
    vae, z = make_vae(attention=False), latents(shape)
    group = dist.new_group(list(range(dist.get_world_size())))  # an explicit group, as the runtime passes
    out = parallel_decode(vae, z, group)
    if dist.get_rank() != 0:
        assert out is None
        return
    h, w = shape[3], shape[4]
    tile = band_tile_size(h, w, dist.get_world_size())
    assert torch.equal(out, vae.decode(z, tiled=True, tile_size=tile))
    untiled = vae.decode(z)
    stride = default_tile_stride(tile)
    rows = far_from_cuts(h, tile[0], stride[0], 8)
    cols = far_from_cuts(w, tile[1], stride[1], 8)
    assert rows.all() and cols.any() and not cols.all()
    diff = (out - untiled).abs()
    far = diff[..., cols]
    assert far.max() < ATOL, far.max()
    print(f"bands {tile}: near the cuts max {diff[..., ~cols].max():.3f}, far from them max {far.max():.2e}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_decode_bands(world_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 x 63 latent: vertical bands; 2 ranks: tiles 0:42, 32:63; 4 ranks: 0:21, 16:37, 32:53, 48:63
    # (bands of unequal width, the last one the remainder).
    spawn(functools.partial(_band_worker, (1, 16, 2, 4, 63)), world_size, monkeypatch)


def _wan22_worker(shape: tuple[int, ...], tile: tuple[int, int] | None) -> None:
    vae, z = make_vae(wan22=True), latents(shape)
    out = parallel_decode(vae, z, None, tile)
    if dist.get_rank() != 0:
        assert out is None
        return
    if tile is None:
        tile = band_tile_size(shape[3], shape[4], dist.get_world_size())
    expected = vae.decode(z, tiled=True, tile_size=tile)
    assert out.shape == expected.shape == (shape[0], 3, 1 + 4 * (shape[2] - 1), 16 * shape[3], 16 * shape[4])
    assert torch.equal(out, expected), (out - expected).abs().max()


def test_wan22_vae_one_rank_without_process_group() -> None:
    vae = make_vae(wan22=True)
    z = latents((1, 8, 2, 5, 6))
    assert torch.equal(parallel_decode(vae, z, None), vae.decode(z))
    assert torch.equal(parallel_decode(vae, z, None, (3, 4)), vae.decode(z, tiled=True, tile_size=(3, 4)))


@pytest.mark.parametrize("tile", [(4, 4), None])
def test_parallel_decode_takes_the_wan22_vae(tile, monkeypatch: pytest.MonkeyPatch) -> None:
    # Wan2.2's decoder works in patch space (12 channels at 8x, unfolded to 16x pixels): the tiles are gathered and
    # blended there, as its single-rank tiled decode does. 6 x 7 latent: tiles of 4 every 3 (3 x 3), or two bands.
    spawn(functools.partial(_wan22_worker, (1, 8, 2, 6, 7), tile), 2, monkeypatch)
