"""Wan DiT against diffusers' WanTransformer3DModel with the same weights, and key layouts both ways."""

from __future__ import annotations

import pytest
import torch

from telefuser.models.wan.dit import WAN21_1_3B, WAN21_14B, WanDiT, WanDiTConfig
from telefuser.models.wan.dit_keys import detect_layout, diffusers_to_wan, to_wan_layout, wan_to_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402


def diffusers_model(cfg: WanDiTConfig, **kw) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if cfg.qk_norm else None,
        eps=cfg.eps,
        **kw,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    # Fresh values everywhere: default inits leave norm weights at 1 and biases at 0, which would hide swaps.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


TINY = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=256)


@pytest.mark.parametrize("cfg,extra", [(TINY, {}), (WanDiTConfig(**{**TINY.__dict__, "model_type": "i2v", "in_dim": 36}), {"image_dim": 1280, "added_kv_proj_dim": 64})])
def test_matches_diffusers(cfg: WanDiTConfig, extra: dict) -> None:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ref = diffusers_model(cfg, **extra).eval()
    randomize(ref, gen)
    ours = WanDiT(cfg).eval()
    ours.load_state_dict(to_wan_layout(ref.state_dict()), strict=True)

    x = torch.randn(2, 16, 3, 8, 12, generator=gen)
    t = torch.tensor([937.0, 12.5])
    # I2V: diffusers splits image from text tokens assuming 512 text tokens (Wan's text_len).
    text_len = 512 if cfg.model_type == "i2v" else 7
    context = torch.randn(2, text_len, cfg.text_dim, generator=gen)
    kwargs, ref_kwargs = {}, {}
    if cfg.model_type == "i2v":
        y = torch.randn(2, cfg.in_dim - 16, 3, 8, 12, generator=gen)
        clip = torch.randn(2, 257, 1280, generator=gen)
        kwargs = {"y": y, "clip_fea": clip}
        ref_in = torch.cat([x, y], dim=1)
        ref_kwargs = {"encoder_hidden_states_image": clip}
    else:
        ref_in = x
    with torch.no_grad():
        out = ours(x, t, context, **kwargs)
        expected = ref(ref_in, t, context, return_dict=False, **ref_kwargs)[0]
    assert out.shape == (2, cfg.out_dim, 3, 8, 12)
    # fp32 throughout on both sides; the only differences are summation order in
    # matmuls/attention and the float64 vs float32 sinusoid, ~1e-6 relative.
    assert rel_err(out, expected) < 1e-4


@pytest.mark.parametrize("cfg", [WAN21_1_3B, WAN21_14B])
def test_full_size_keys_and_shapes(cfg: WanDiTConfig) -> None:
    with torch.device("meta"):
        ours = WanDiT(cfg)
        ref = diffusers_model(cfg)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in diffusers_to_wan(ref.state_dict()).items()}
    assert ours_shapes == ref_shapes
    count = sum(v.numel() for v in ours.state_dict().values())
    expected = {1536: 1_418_996_800, 5120: 14_288_491_584}[cfg.dim]  # the published ~1.3B / ~14B
    assert count == sum(v.numel() for v in ref.state_dict().values()) == expected


def test_layout_round_trip_and_detection() -> None:
    cfg = WanDiTConfig(**{**TINY.__dict__, "model_type": "i2v", "in_dim": 36})
    wan = WanDiT(cfg).state_dict()
    diff = wan_to_diffusers(wan)
    assert detect_layout(wan) == "wan" and detect_layout(diff) == "diffusers"
    assert set(diff) == set(diffusers_model(cfg, image_dim=1280, added_kv_proj_dim=64).state_dict())
    back = diffusers_to_wan(diff)
    assert list(back) == list(wan) and all(back[k] is wan[k] for k in wan)
    with pytest.raises(ValueError, match="neither"):
        detect_layout(["encoder.conv1.weight"])
