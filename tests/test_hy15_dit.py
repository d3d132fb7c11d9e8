"""HunyuanVideo-1.5 DiT against diffusers' HunyuanVideo15Transformer3DModel with the same weights (T2V and I2V
inputs, one video and a batch of two whose prompts differ in length), key layouts both ways, and the published
architecture's size on the meta device.

Tolerances (relative L2 error of the output), float32 on both sides:
- TOL = 5e-6 with the sinusoidal time embedding computed as diffusers computes it (float32 angles, the
  `float32_time_angles` fixture): what remains is the order of float32 operations (norm statistics, RoPE angles
  built in float64 here, attention over the valid context tokens only here against masked attention over all of
  them there, whose masked keys contribute exact zeros). Measured 4e-7..6e-7.
- TOL_OWN = 2e-4 with our own time embedding, whose angles t * 10000^(-i/128) are computed in float64: diffusers'
  float32 angle for t = 700 is off by up to half an ulp of 700 (3e-5 rad), which moves the output by 3e-5..5e-5
  measured (ours is the more exact one).
A wrong weight, a swapped half or a misordered token gives errors of order 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from telefuser.models.hunyuan15.dit import HUNYUAN15_8B, HunyuanVideo15DiT, HunyuanVideo15DiTConfig, condition_latents
from telefuser.models.hunyuan15.dit_keys import (detect_layout, diffusers_to_tencent, from_layout,
                                                 tencent_to_diffusers, to_tencent_layout)

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402

TOL = 5e-6
TOL_OWN = 2e-4


def _float32_angles(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


@pytest.fixture
def float32_time_angles(monkeypatch):
    from telefuser.models.hunyuan15 import dit

    monkeypatch.setattr(dit, "timestep_embedding", _float32_angles)
TINY = HunyuanVideo15DiTConfig(in_channels=9, out_channels=4, hidden_size=64, heads_num=2, mlp_hidden_dim=256,
                               double_blocks=2, rope_dim_list=[8, 12, 12], text_states_dim=40, byt5_dim=16,
                               byt5_hidden=2048, vision_states_dim=24)


def diffusers_model(cfg: HunyuanVideo15DiTConfig) -> HunyuanVideo15Transformer3DModel:
    return HunyuanVideo15Transformer3DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.heads_num,
        attention_head_dim=cfg.head_dim, num_layers=cfg.double_blocks, num_refiner_layers=cfg.refiner_blocks,
        mlp_ratio=cfg.mlp_hidden_dim / cfg.hidden_size, patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
        text_embed_dim=cfg.text_states_dim, text_embed_2_dim=cfg.byt5_dim, image_embed_dim=cfg.vision_states_dim,
        rope_theta=cfg.rope_theta, rope_axes_dim=tuple(cfg.rope_dim_list), use_meanflow=cfg.use_meanflow)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomized_pair(cfg: HunyuanVideo15DiTConfig, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ref = diffusers_model(cfg).eval()
    with torch.no_grad():  # fresh values everywhere: default inits (ones, zeros) would hide swaps
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ours = HunyuanVideo15DiT(cfg).eval()
    ours.load_state_dict(diffusers_to_tencent(ref.state_dict()), strict=True)
    return ref, ours


def inputs(cfg: HunyuanVideo15DiTConfig, batch: int, i2v: bool, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    c = cfg.out_channels
    latents = torch.randn(batch, c, 3, 4, 6, generator=gen)
    image_latent = torch.randn(1, c, 1, 4, 6, generator=gen) if i2v else None
    text_mask = torch.zeros(batch, 12, dtype=torch.long)
    byt5_mask = torch.zeros(batch, 8, dtype=torch.long)
    for i in range(batch):
        text_mask[i, : 7 - 2 * i] = 1
        byt5_mask[i, : 3 + i] = 1
    vision = torch.randn(batch, 5, cfg.vision_states_dim, generator=gen) if i2v else torch.zeros(batch, 5, cfg.vision_states_dim)
    return {"latents": latents, "y": condition_latents(latents, image_latent),
            "t": torch.tensor([700.0, 250.0][:batch]),
            "text": torch.randn(batch, 12, cfg.text_states_dim, generator=gen), "text_mask": text_mask,
            "byt5": torch.randn(batch, 8, cfg.byt5_dim, generator=gen), "byt5_mask": byt5_mask, "vision": vision}


def run_both(ref, ours, x: dict, t_r: torch.Tensor | None = None):
    with torch.no_grad():
        expected = ref(hidden_states=torch.cat([x["latents"], x["y"]], 1), timestep=x["t"],
                       encoder_hidden_states=x["text"], encoder_attention_mask=x["text_mask"],
                       encoder_hidden_states_2=x["byt5"], encoder_attention_mask_2=x["byt5_mask"],
                       image_embeds=x["vision"], timestep_r=t_r, return_dict=False)[0]
        got = ours(x["latents"], x["t"], x["text"], x["text_mask"], x["byt5"], x["byt5_mask"], x["vision"], y=x["y"],
                   t_r=t_r)
    return got, expected


@pytest.mark.parametrize("batch", [1, 2], ids=["one", "batch2"])
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_matches_diffusers(i2v: bool, batch: int, float32_time_angles) -> None:
    ref, ours = randomized_pair(TINY)
    got, expected = run_both(ref, ours, inputs(TINY, batch, i2v))
    assert got.shape == expected.shape == (batch, TINY.out_channels, 3, 4, 6)
    assert rel_err(got, expected) < TOL


def test_matches_diffusers_own_time_embedding() -> None:
    ref, ours = randomized_pair(TINY)
    got, expected = run_both(ref, ours, inputs(TINY, 2, True))
    assert rel_err(got, expected) < TOL_OWN


def test_meanflow_matches_diffusers(float32_time_angles) -> None:
    """The SR models' MeanFlow time embedding (time_r_in <-> timestep_embedder_r) and 98-style wider input."""
    cfg = HunyuanVideo15DiTConfig(**{**TINY.__dict__, "in_channels": 14, "use_meanflow": True})
    ref, ours = randomized_pair(cfg)
    x = inputs(cfg, 1, False)
    x["y"] = torch.cat([x["y"], torch.randn(1, 5, 3, 4, 6)], 1)
    got, expected = run_both(ref, ours, x, t_r=torch.tensor([300.0]))
    assert rel_err(got, expected) < TOL


def test_glyph_absent_and_image_tokens_change_output(float32_time_angles) -> None:
    ref, ours = randomized_pair(TINY)
    x = inputs(TINY, 1, True)
    x["byt5_mask"].zero_()  # no quoted text: no glyph token
    got, expected = run_both(ref, ours, x)
    assert rel_err(got, expected) < TOL
    x2 = dict(x, vision=torch.zeros_like(x["vision"]))
    got_t2v, _ = run_both(ref, ours, x2)
    assert rel_err(got_t2v, got) > 1e-3


def test_layouts_round_trip_and_detect() -> None:
    model = HunyuanVideo15DiT(TINY)
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    diff = tencent_to_diffusers(state)
    assert detect_layout(state) == "tencent" and detect_layout(diff) == "diffusers"
    assert set(diff) == set(diffusers_model(TINY).state_dict())
    back = to_tencent_layout(diff)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    names = from_layout(dict.fromkeys(diff), "diffusers")
    assert "double_blocks.1.txt_attn_k_norm.weight" in names and "final_layer.linear.weight" in names


def test_published_size_on_meta() -> None:
    with torch.device("meta"):
        model = HunyuanVideo15DiT(HUNYUAN15_8B)
    count = sum(p.numel() for p in model.parameters())
    assert 8.2e9 < count < 8.4e9, count  # "8.3B parameters"
    assert model.img_in.proj.weight.shape == (2048, 65, 1, 1, 1)


def test_condition_latents_i2v() -> None:
    lat = torch.randn(1, 4, 3, 2, 2)
    img = torch.randn(1, 4, 1, 2, 2)
    y = condition_latents(lat, img)
    assert torch.equal(y[:, :4, 0], img[:, :, 0]) and not y[:, :4, 1:].any()
    assert y[:, 4, 0].eq(1).all() and not y[:, 4, 1:].any()
    assert not condition_latents(lat).any()
