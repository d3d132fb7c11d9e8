"""HunyuanVideo-1.5 VAE against diffusers' AutoencoderKLHunyuanVideo15 with the same weights: encode, decode and
tiled decode on a tiny config; key layouts both ways; the published architecture on the meta device.

Tolerance: float32 on both sides and the same operations in the same order except the middle block's attention
(frame by frame against the keys so far here, one masked attention there; masked keys weigh exactly 0) and the
tile blend's arithmetic: measured relative errors 0 (bitwise) for encode and decode, 2.6e-7 for the tiled decode;
1e-5 leaves room for other platforms' kernels, while a wrong resampling order, shortcut or key gives errors of
order 1.
"""

from __future__ import annotations

import pytest
import torch

from telefuser.models.hunyuan15.vae import HunyuanVideo15VAE, HunyuanVideo15VAEConfig
from telefuser.models.hunyuan15.vae_keys import detect_layout, diffusers_to_tencent, tencent_to_diffusers, to_tencent_layout

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLHunyuanVideo15  # noqa: E402

TOL = 1e-5
# 4x space, 2x time: level 0 resamples space only, level 1 space and time (as the published 16x/4x's last two).
TINY = HunyuanVideo15VAEConfig(latent_channels=4, block_out_channels=[8, 16, 16], layers_per_block=1,
                               spatial_ratio=4, temporal_ratio=2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pair(cfg: HunyuanVideo15VAEConfig, seed: int = 0):
    ref = AutoencoderKLHunyuanVideo15(latent_channels=cfg.latent_channels, block_out_channels=tuple(cfg.block_out_channels),
                                      layers_per_block=cfg.layers_per_block, spatial_compression_ratio=cfg.spatial_ratio,
                                      temporal_compression_ratio=cfg.temporal_ratio, scaling_factor=cfg.scaling_factor).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = 0.05 if name.endswith("gamma") else 0.15
            p.copy_((1.0 if name.endswith("gamma") else 0.0) + torch.randn(p.shape, generator=gen) * scale)
    ours = HunyuanVideo15VAE(cfg).eval()
    ours.load_state_dict(diffusers_to_tencent(ref.state_dict()), strict=True)
    return ref, ours


def test_encode_matches_diffusers() -> None:
    ref, ours = pair(TINY)
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(video).latent_dist.mode() * TINY.scaling_factor
    got = ours.encode(video)
    assert got.shape == expected.shape == (1, 4, 3, 4, 6)
    assert rel_err(got, expected) < TOL


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
def test_decode_matches_diffusers(tiled: bool) -> None:
    ref, ours = pair(TINY)
    z = torch.randn(1, 4, 3, 7, 7, generator=torch.Generator().manual_seed(2))
    if tiled:  # 4-latent tiles every 3: diffusers' tiling with 16-pixel tiles and its 0.25 overlap
        ref.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_latent_min_height=4,
                          tile_latent_min_width=4, tile_overlap_factor=0.25)
    with torch.no_grad():
        expected = ref.decode(z / TINY.scaling_factor).sample.clamp(-1, 1)
    got = ours.decode(z, tiled=tiled, tile_size=(4, 4))
    assert got.shape == expected.shape == (1, 3, 5, 28, 28)
    assert rel_err(got, expected) < TOL


def test_layouts_round_trip_and_detect() -> None:
    state = HunyuanVideo15VAE(TINY).state_dict()
    diff = tencent_to_diffusers(state)
    assert detect_layout(state) == "tencent" and detect_layout(diff) == "diffusers"
    assert set(diff) == set(AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                                                        spatial_compression_ratio=4, temporal_compression_ratio=2).state_dict())
    assert to_tencent_layout(diff).keys() == state.keys()


def test_published_architecture_on_meta() -> None:
    with torch.device("meta"):
        vae = HunyuanVideo15VAE(HunyuanVideo15VAEConfig())
        ref = AutoencoderKLHunyuanVideo15()
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in diffusers_to_tencent(ref.state_dict()).items()}
    assert ours == theirs
    assert "encoder.down.3.downsample.conv.conv.weight" in ours and "decoder.up.0.upsample.conv.conv.weight" in ours


@pytest.mark.parametrize("chunk", [1, 2])
def test_frame_chunked_decode_equals_one_pass(chunk: int) -> None:
    """The causal decode, chunk by chunk with the carried state, gives the one-pass video (1e-5: the same
    operations on other tensor sizes; measured ~1e-7)."""
    _, ours = pair(TINY)
    z = torch.randn(1, 4, 4, 4, 6, generator=torch.Generator().manual_seed(6)) / TINY.scaling_factor
    with torch.no_grad():
        whole = ours._decode_frames(z, chunk=None)
        chunked = ours._decode_frames(z, chunk=chunk)
    assert chunked.shape == whole.shape == (1, 3, 7, 16, 24)
    assert rel_err(chunked, whole) < 1e-5
