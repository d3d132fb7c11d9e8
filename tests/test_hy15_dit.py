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
    from telefuser.models.hunyuan15 import dit_layers as dit  # where the time embedder looks it up

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


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Tencent's real-valued RoPE: x * cos + rotate_half(x) * sin on interleaved pairs, cos/sin repeated per pair."""
    c, s = cos.repeat_interleave(2, -1)[None, :, None], sin.repeat_interleave(2, -1)[None, :, None]
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return x * c + rotated * s


def test_single_stream_block_matches_float64_reference() -> None:
    """No published checkpoint or diffusers class has single-stream blocks: checked against a float64 evaluation
    written from Tencent's MMSingleStreamBlock (1e-5; float32 against float64, measured ~1e-7)."""
    from telefuser.models.hunyuan15.dit import SingleStreamBlock, rope_cos_sin

    cfg = HunyuanVideo15DiTConfig(**{**TINY.__dict__, "single_blocks": 1})
    gen = torch.Generator().manual_seed(3)
    block = SingleStreamBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    n, ctx, h, heads = 12, 5, cfg.hidden_size, cfg.heads_num
    x, vec = torch.randn(1, n + ctx, h, generator=gen), torch.randn(1, h, generator=gen)
    cos, sin = rope_cos_sin((1, 3, 4), cfg.rope_dim_list, cfg.rope_theta)
    with torch.no_grad():
        got = block(x, vec, n, (cos, sin), None)
    sd = {k: v.double() for k, v in block.state_dict().items()}
    lin = lambda name, t: t @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    xd, vd = x.double(), vec.double()
    shift, scale, gate = lin("modulation.linear", torch.nn.functional.silu(vd)).chunk(3, -1)
    xm = torch.nn.functional.layer_norm(xd, (h,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    q = rms(lin("linear1_q", xm).unflatten(-1, (heads, -1)), sd["q_norm.weight"])
    k = rms(lin("linear1_k", xm).unflatten(-1, (heads, -1)), sd["k_norm.weight"])
    v = lin("linear1_v", xm).unflatten(-1, (heads, -1))
    q = torch.cat([_rope_ref(q[:, :n], cos.double(), sin.double()), q[:, n:]], 1)
    k = torch.cat([_rope_ref(k[:, :n], cos.double(), sin.double()), k[:, n:]], 1)
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim), -1)
    attn = torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)
    mlp = torch.nn.functional.gelu(lin("linear1_mlp", xm), approximate="tanh")
    expected = xd + gate[:, None] * lin("linear2.fc", torch.cat([attn, mlp], -1))
    assert rel_err(got, expected) < 1e-5


def test_single_stream_blocks_run_in_the_model() -> None:
    cfg = HunyuanVideo15DiTConfig(**{**TINY.__dict__, "single_blocks": 2})
    model = HunyuanVideo15DiT(cfg).eval()
    x = inputs(cfg, 2, True)
    with torch.no_grad():
        out = model(x["latents"], x["t"], x["text"], x["text_mask"], x["byt5"], x["byt5_mask"], x["vision"], y=x["y"])
    assert out.shape == x["latents"].shape and torch.isfinite(out).all()
