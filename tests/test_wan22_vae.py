"""Wan2.2 VAE against diffusers' AutoencoderKLWan (Wan2.2 options) with the same weights; key layouts both ways.

Normalisation: our `encode` returns (mu - mean) / std and our `decode` takes that; diffusers' VAE works on raw
latents (its `encode` gives the raw posterior, its `decode` takes raw latents) and its pipelines normalise
outside it (`(latents - latents_mean) * (1 / latents_std)` before the DiT, `latents / (1 / latents_std) +
latents_mean` before `vae.decode`). The tests apply that pipeline arithmetic on the diffusers side, with the
48 statistics of its config (which we set to Wan2.2's, as diffusers' own Wan2.2 config does).
"""

from __future__ import annotations

import copy

import pytest
import torch

from telefuser.models.wan.vae_blocks import CausalConv3d
from telefuser.models.wan.vae22 import LATENT_MEAN, LATENT_STD, Wan22VAE, Wan22VAEConfig, patchify
from telefuser.models.wan.vae22_keys import detect_layout, diffusers_to_wan, to_wan_layout, wan_to_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.models.autoencoders import autoencoder_kl_wan  # noqa: E402

# The real architecture at small widths: z_dim 48 (so the real statistics are used), 4 stages, the decoder
# wider than the encoder as in Wan2.2 (160 / 256), 1 residual block per encoder stage (2 per decoder stage).
TINY = Wan22VAEConfig(z_dim=48, base_dim=8, decoder_base_dim=16, num_res_blocks=1)


def diffusers_vae(cfg: Wan22VAEConfig) -> AutoencoderKLWan:
    """diffusers' AutoencoderKLWan with the options of diffusers' own Wan2.2 VAE config."""
    return AutoencoderKLWan(base_dim=cfg.base_dim, decoder_base_dim=cfg.decoder_base_dim, z_dim=cfg.z_dim,
                            dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
                            temperal_downsample=list(cfg.temporal_downsample), is_residual=True,
                            in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                            scale_factor_temporal=4, latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture()
def pair() -> tuple[Wan22VAE, AutoencoderKLWan, torch.Generator]:
    seed = torch.seed() % 2**31
    print(f"seed {seed}")  # shown by pytest on failure, to replay it
    gen = torch.Generator().manual_seed(seed)
    ref = diffusers_vae(TINY).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            # Random gains/weights, small enough that few outputs reach the [-1, 1] clamp (which would hide
            # errors there): about 1% do (0.05 would clamp ~10%, 0.1 a quarter).
            gain = name.endswith("gamma")
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if gain else 0.03) + (1.0 if gain else 0.0))
    ours = Wan22VAE(TINY).eval()
    ours.load_state_dict(to_wan_layout(ref.state_dict()), strict=True)
    return ours, ref, gen


def _stats(z: torch.Tensor, ref: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(ref.config.latents_mean, dtype=z.dtype).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref.config.latents_std, dtype=z.dtype).view(1, -1, 1, 1, 1)
    return mean, inv_std


def _denormalise(z: torch.Tensor, ref: AutoencoderKLWan) -> torch.Tensor:
    mean, inv_std = _stats(z, ref)
    return z / inv_std + mean  # diffusers' Wan pipelines, before vae.decode


# fp32 on both sides with the same operations up to summation order (convolutions, the shortcuts' channel
# means, attention): measured ~1e-6 relative. A wrong tap, channel order, frame or shortcut shows as >1e-2.
TOL = 1e-4


def test_decode_matches_diffusers(pair) -> None:
    ours, ref, gen = pair
    z = torch.randn(1, 48, 3, 3, 4, generator=gen)
    with torch.no_grad():
        out = ours.decode(z)
        expected = ref.decode(_denormalise(z, ref), return_dict=False)[0]
    assert out.shape == (1, 3, 9, 48, 64)
    assert (expected.abs() == 1).float().mean() < 0.1  # the clamp hides little of the comparison
    assert rel_err(out, expected) < TOL


def test_encode_matches_diffusers(pair) -> None:
    ours, ref, gen = pair
    video = torch.rand(2, 3, 9, 64, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        out = ours.encode(video)
        mu = ref.encode(video).latent_dist.mean  # raw: diffusers' VAE does not normalise
    mean, inv_std = _stats(mu, ref)
    expected = (mu - mean) * inv_std  # diffusers' Wan pipelines, after vae.encode
    assert out.shape == (2, 48, 3, 4, 2)
    assert rel_err(out, expected) < TOL


def test_single_frame_round_trip_shapes(pair) -> None:
    ours, ref, gen = pair
    image = torch.rand(1, 3, 1, 32, 48, generator=gen) * 2 - 1
    with torch.no_grad():
        z = ours.encode(image)
        decoded = ours.decode(z)
        expected = ref.decode(_denormalise(z, ref), return_dict=False)[0]
    assert z.shape == (1, 48, 1, 2, 3) and decoded.shape == (1, 3, 1, 32, 48)
    assert rel_err(decoded, expected) < TOL


def test_patchify_matches_wan_and_diffusers(pair) -> None:
    _, _, gen = pair
    video = torch.randn(2, 3, 5, 8, 6, generator=gen)
    ours = patchify(video, 2)
    assert torch.equal(ours, autoencoder_kl_wan.patchify(video, 2))
    # Wan's rule, written out: channel c*4 + dw*2 + dh holds pixel (2h + dh, 2w + dw) of channel c.
    for c, dh, dw in [(0, 0, 0), (1, 1, 0), (2, 0, 1), (2, 1, 1)]:
        assert torch.equal(ours[:, c * 4 + dw * 2 + dh], video[:, c, :, dh::2, dw::2])


def test_tiled_decode_matches_diffusers_tiling(pair) -> None:
    ours, ref, gen = pair
    z = torch.randn(1, 48, 2, 8, 10, generator=gen)  # 2 x 3 tiles, the last row and column cut short
    # diffusers counts tiles in video pixels: 96/64 px are 6/4 latent pixels at 16x.
    ref.enable_tiling(tile_sample_min_height=96, tile_sample_min_width=96,
                      tile_sample_stride_height=64, tile_sample_stride_width=64)
    with torch.no_grad():
        out = ours.decode(z, tiled=True, tile_size=(6, 6), tile_stride=(4, 4))
        expected = ref.decode(_denormalise(z, ref), return_dict=False)[0]
        untiled = ours.decode(z)
        one_tile = ours.decode(z, tiled=True, tile_size=(8, 10), tile_stride=(8, 10))
    assert out.shape == untiled.shape == (1, 3, 5, 128, 160)
    assert rel_err(out, expected) < TOL
    assert torch.equal(one_tile, untiled)  # one tile covering the latent is the untiled decode


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
        video = ours.decode(torch.randn(1, 48, 5, 2, 2, generator=gen))
    assert video.shape == (1, 3, 17, 32, 32) and len(frames_seen) > 0
    assert max(frames_seen) == 4  # one latent frame in, at most 4 frames at full rate: never the video's 17


def test_encode_rejects_bad_shapes(pair) -> None:
    ours, _, gen = pair
    with pytest.raises(ValueError, match=r"1\+4k"):
        ours.encode(torch.rand(1, 3, 8, 32, 32, generator=gen))
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode(torch.rand(1, 3, 5, 32, 40, generator=gen))


# Names of Wan2.2_VAE.pth checked against diffusers' converter of that file (scripts/convert_wan_to_diffusers.py,
# `convert_vae_22`, which loads its output strictly into AutoencoderKLWan) and Wan2.2's wan/modules/vae2_2.py.
WAN22_KEYS = {
    "encoder.conv1.weight": (160, 12, 3, 3, 3),
    "encoder.downsamples.0.downsamples.0.residual.0.gamma": (160, 1, 1, 1),
    "encoder.downsamples.0.downsamples.1.residual.6.weight": (160, 160, 3, 3, 3),
    "encoder.downsamples.0.downsamples.2.resample.1.weight": (160, 160, 3, 3),
    "encoder.downsamples.1.downsamples.0.shortcut.weight": (320, 160, 1, 1, 1),
    "encoder.downsamples.1.downsamples.2.time_conv.weight": (320, 320, 3, 1, 1),
    "encoder.downsamples.3.downsamples.1.residual.2.weight": (640, 640, 3, 3, 3),
    "encoder.middle.1.to_qkv.weight": (1920, 640, 1, 1),
    "encoder.head.2.weight": (96, 640, 3, 3, 3),
    "conv1.weight": (96, 96, 1, 1, 1),
    "conv2.weight": (48, 48, 1, 1, 1),
    "decoder.conv1.weight": (1024, 48, 3, 3, 3),
    "decoder.middle.0.residual.0.gamma": (1024, 1, 1, 1),
    "decoder.upsamples.0.upsamples.0.residual.2.weight": (1024, 1024, 3, 3, 3),
    "decoder.upsamples.0.upsamples.3.resample.1.weight": (1024, 1024, 3, 3),
    "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
    "decoder.upsamples.2.upsamples.0.shortcut.weight": (512, 1024, 1, 1, 1),
    "decoder.upsamples.2.upsamples.3.resample.1.weight": (512, 512, 3, 3),
    "decoder.upsamples.3.upsamples.2.residual.6.weight": (256, 256, 3, 3, 3),
    "decoder.head.2.weight": (12, 256, 3, 3, 3),
}


def test_full_size_keys_round_trip_and_parameter_count() -> None:
    cfg = Wan22VAEConfig()
    with torch.device("meta"):
        ours = Wan22VAE(cfg).state_dict()
        ref = diffusers_vae(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in wan_to_diffusers(ours).items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert {k: tuple(ours[k].shape) for k in WAN22_KEYS} == WAN22_KEYS
    assert not any(k.startswith("decoder.upsamples.3.upsamples.3.") for k in ours)  # the last stage: no resampler
    assert detect_layout(ours) == "wan" and detect_layout(ref) == "diffusers"
    back = diffusers_to_wan(wan_to_diffusers(ours))
    assert set(back) == set(ours) and all(back[k] is ours[k] for k in ours)
    forth = wan_to_diffusers(diffusers_to_wan(ref))
    assert set(forth) == set(ref) and all(forth[k] is ref[k] for k in ref)
    assert to_wan_layout(ours) == ours
    # The real Wan2.2 VAE: 704,688,668 parameters (diffusers' AutoencoderKLWan with its Wan2.2 config agrees).
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in ref.values()) == 704_688_668


def test_wan21_layouts_are_refused() -> None:
    from telefuser.models.wan.vae import WanVAE, WanVAEConfig
    from telefuser.models.wan.vae_keys import wan_to_diffusers as wan21_to_diffusers

    with torch.device("meta"):
        wan21 = WanVAE(WanVAEConfig()).state_dict()
    for keys in (wan21, wan21_to_diffusers(wan21)):
        with pytest.raises(ValueError, match="Wan2.1"):
            detect_layout(keys)


def test_statistics_are_wan22s() -> None:
    assert len(LATENT_MEAN) == len(LATENT_STD) == 48 and min(LATENT_STD) > 0
    vae = Wan22VAE(TINY)
    assert torch.equal(vae.latent_stats[0].flatten(), torch.tensor(LATENT_MEAN))
    assert torch.equal(vae.latent_stats[1].flatten(), torch.tensor(LATENT_STD))
    small = Wan22VAE(Wan22VAEConfig(z_dim=4, base_dim=4, decoder_base_dim=4, num_res_blocks=1))
    assert torch.equal(small.latent_stats.flatten(), torch.tensor([0.0] * 4 + [1.0] * 4))


def _run_on(vae: Wan22VAE, z: torch.Tensor, video: torch.Tensor, device: str,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    vae = copy.deepcopy(vae).to(device, dtype)
    with torch.no_grad():
        decoded, encoded = vae.decode(z.to(device, dtype)), vae.encode(video.to(device, dtype))
    return decoded.float().cpu(), encoded.float().cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(pair) -> None:
    ours, _, gen = pair
    z = torch.randn(1, 48, 3, 6, 10, generator=gen)
    video = torch.rand(1, 3, 9, 96, 160, generator=gen) * 2 - 1
    expected = _run_on(ours, z, video, "cpu", torch.float32)
    # fp32 without TF32: the channels-last cuDNN path computes the same sums as the CPU, in another order.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        fp32 = _run_on(ours, z, video, "cuda", torch.float32)
    for out, ref in zip(fp32, expected):
        assert rel_err(out, ref) < TOL
    # bf16 (as deployed): the bound is the same model's own bf16 rounding noise measured on the CPU.
    bf16, cpu_bf16 = _run_on(ours, z, video, "cuda", torch.bfloat16), _run_on(ours, z, video, "cpu", torch.bfloat16)
    for out, noise, ref in zip(bf16, cpu_bf16, expected):
        assert rel_err(out, ref) < 2 * rel_err(noise, ref), (rel_err(out, ref), rel_err(noise, ref))
