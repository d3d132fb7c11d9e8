"""Wan VAE against diffusers' AutoencoderKLWan with the same weights; key layouts both ways."""

from __future__ import annotations

import copy

import pytest
import torch

from telefuser.models.wan.vae import LATENT_MEAN, LATENT_STD, WanVAE, WanVAEConfig
from telefuser.models.wan.vae_blocks import AttentionBlock, CausalConv3d
from telefuser.models.wan.vae_keys import detect_layout, diffusers_to_wan, to_wan_layout, wan_to_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

TINY = WanVAEConfig(z_dim=16, base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def diffusers_vae(cfg: WanVAEConfig) -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                            num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temporal_downsample))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture()
def pair() -> tuple[WanVAE, AutoencoderKLWan, torch.Generator]:
    seed = torch.seed() % 2**31
    print(f"seed {seed}")  # shown by pytest on failure, to replay it
    gen = torch.Generator().manual_seed(seed)
    ref = diffusers_vae(TINY).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            # Random gains/weights, kept moderate so the [-1, 1] clamp at the output does not hide errors.
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if name.endswith("gamma") else 0.1) + (1.0 if name.endswith("gamma") else 0.0))
    ours = WanVAE(TINY).eval()
    ours.load_state_dict(to_wan_layout(ref.state_dict()), strict=True)
    return ours, ref, gen


def _denormalise(z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)
    return z * std + mean


# fp32 on both sides with identical operations up to summation order: ~1e-6 relative.
TOL = 1e-4


def test_decode_matches_diffusers(pair) -> None:
    ours, ref, gen = pair
    z = torch.randn(1, 16, 3, 4, 6, generator=gen)
    with torch.no_grad():
        out = ours.decode(z)
        expected = ref.decode(_denormalise(z), return_dict=False)[0]
    assert out.shape == (1, 3, 9, 32, 48)
    assert rel_err(out, expected) < TOL


@pytest.mark.parametrize("frames", [9, 1])  # a video, and the single conditioning image of image-to-video
def test_encode_matches_diffusers(pair, frames) -> None:
    ours, ref, gen = pair
    video = torch.rand(1, 3, frames, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        out = ours.encode(video)
        mean = ref.encode(video).latent_dist.mean
    expected = (mean - torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)) / torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)
    assert out.shape == (1, 16, (frames - 1) // 4 + 1, 4, 4)
    assert rel_err(out, expected) < TOL


def test_tiled_decode_matches_diffusers_tiling(pair) -> None:
    ours, ref, gen = pair
    z = torch.randn(1, 16, 2, 10, 14, generator=gen)
    ref.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=48,
                      tile_sample_stride_height=32, tile_sample_stride_width=32)
    with torch.no_grad():
        out = ours.decode(z, tiled=True, tile_size=(6, 6), tile_stride=(4, 4))
        expected = ref.decode(_denormalise(z), return_dict=False)[0]
        untiled = ours.decode(z)
        one_tile = ours.decode(z, tiled=True, tile_size=(10, 14), tile_stride=(10, 14))
    assert out.shape == untiled.shape == (1, 3, 5, 80, 112)
    assert rel_err(out, expected) < TOL
    # A tile covering the whole latent is exactly the untiled decode. (With generic random weights
    # overlapping tiles have no useful bound against untiled, since the mid-block attention sees the whole
    # frame; test_tiled_decode_matches_untiled_when_tiles_see_enough bounds it where the context is local.)
    assert torch.equal(one_tile, untiled)


def _make_spatially_pointwise(vae: WanVAE) -> None:
    """Keep only the centre spatial tap of every convolution and silence the attention's output.

    The decoder then maps each latent pixel to its own 8x8 block of pixels (time still mixes causally), so
    any spatial tiling must reproduce the untiled decode exactly, seams included.
    """
    with torch.no_grad():
        for module in vae.decoder.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.kernel_size[-1] == 3:
                centre = module.weight[..., 1:2, 1:2].clone()
                module.weight.zero_()[..., 1:2, 1:2] = centre
            elif isinstance(module, AttentionBlock):
                module.proj.weight.zero_()
                module.proj.bias.zero_()


def test_tiled_decode_matches_untiled_when_tiles_see_enough(pair) -> None:
    ours, _, gen = pair
    _make_spatially_pointwise(ours)
    z = torch.randn(1, 16, 2, 11, 13, generator=gen)
    with torch.no_grad():
        untiled = ours.decode(z)
        for tile, stride in [((6, 6), None), ((4, 8), (3, 5)), ((5, 5), (5, 5))]:
            tiled = ours.decode(z, tiled=True, tile_size=tile, tile_stride=stride)
            # Every pixel is the same computation in both (only tensor sizes differ) and the linear seam
            # weights sum to one: fp32 rounding alone, ~1e-7 of the output's unit scale. A misplaced tile,
            # a wrong crop or weights not summing to one shows as errors of order 1.
            assert (tiled - untiled).abs().max().item() < 1e-5, (tile, stride)


def test_decoder_runs_one_latent_frame_at_a_time(pair, monkeypatch) -> None:
    ours, _, gen = pair
    frames_seen: list[int] = []
    convolve = CausalConv3d.convolve
    decoder_convs = set(ours.decoder.modules())

    def recording(conv: CausalConv3d, padded: torch.Tensor) -> torch.Tensor:
        if conv in decoder_convs:
            frames_seen.append(padded.shape[2] - conv._time_pad)
        return convolve(conv, padded)

    monkeypatch.setattr(CausalConv3d, "convolve", recording)
    with torch.no_grad():
        video = ours.decode(torch.randn(1, 16, 5, 2, 2, generator=gen))
    assert video.shape[2] == 17 and len(frames_seen) > 0
    # One latent frame in, at most 4 frames at full rate (past frames aside): never the video's 17.
    assert max(frames_seen) == 4


def test_encode_rejects_frame_counts_other_than_1_plus_4k(pair) -> None:
    ours, _, gen = pair
    with pytest.raises(ValueError, match=r"1\+4k"):
        ours.encode(torch.rand(1, 3, 8, 16, 16, generator=gen))


def test_full_size_keys_and_round_trip() -> None:
    cfg = WanVAEConfig()
    with torch.device("meta"):
        ours = WanVAE(cfg).state_dict()
        ref = diffusers_vae(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in wan_to_diffusers(ours).items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert detect_layout(ours) == "wan" and detect_layout(ref) == "diffusers"
    back = diffusers_to_wan(wan_to_diffusers(ours))
    assert set(back) == set(ours) and all(back[k] is ours[k] for k in ours)
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in ref.values())
    forth = wan_to_diffusers(diffusers_to_wan(ref))
    assert set(forth) == set(ref) and all(forth[k] is ref[k] for k in ref)
    assert to_wan_layout(ours) == ours


def test_tile_stride_defaults_and_validation(pair) -> None:
    ours, _, gen = pair
    z = torch.randn(1, 16, 1, 10, 10, generator=gen)
    small_tiles = ours.decode(z, tiled=True, tile_size=(4, 4))  # stride 3 derived from the tile
    assert small_tiles.shape == (1, 3, 1, 80, 80) and torch.isfinite(small_tiles).all()
    with pytest.raises(ValueError, match="tile_stride"):
        ours.decode(z, tiled=True, tile_size=(4, 4), tile_stride=(5, 5))


def _run_on(vae: WanVAE, z: torch.Tensor, video: torch.Tensor, device: str,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    vae = copy.deepcopy(vae).to(device, dtype)
    with torch.no_grad():
        decoded, encoded = vae.decode(z.to(device, dtype)), vae.encode(video.to(device, dtype))
    return decoded.float().cpu(), encoded.float().cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(pair) -> None:
    ours, _, gen = pair
    z = torch.randn(1, 16, 3, 6, 10, generator=gen)
    video = torch.rand(1, 3, 9, 48, 80, generator=gen) * 2 - 1
    expected = _run_on(ours, z, video, "cpu", torch.float32)
    # fp32 without TF32: the channels-last cuDNN path computes the same sums as the CPU, in another order.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # matmuls are TF32-free by default
        fp32 = _run_on(ours, z, video, "cuda", torch.float32)
    for out, ref in zip(fp32, expected):
        assert rel_err(out, ref) < TOL
    # bf16 (as deployed): no fixed bound holds for random weights, so the bound is the same model's own
    # bf16 rounding noise measured on the CPU; cuDNN also accumulates in fp32, so its noise is alike.
    bf16, cpu_bf16 = _run_on(ours, z, video, "cuda", torch.bfloat16), _run_on(ours, z, video, "cpu", torch.bfloat16)
    for out, noise, ref in zip(bf16, cpu_bf16, expected):
        assert rel_err(out, ref) < 2 * rel_err(noise, ref), (rel_err(out, ref), rel_err(noise, ref))
