"""The HunyuanVideo-1.5 SR stage's model pieces against a float64 evaluation of the published SR forward on a tiny
configuration, SR of a constant, and the published size ratios.

The float64 reference is written here from the published code (hunyuan_video_sr_pipeline.py and upsample.py of
tencent/HunyuanVideo-1.5): per-frame bilinear resize, the SRTo720pUpsampler as plain float64 convolutions with
replicate padding, (1 - s) lq + s noise, the condition assembled channel by channel as the pipeline does
(cond[:, c+1:2c+1] = lq, cond[:, 2c+1] = 1, I2V: cond[:, :c, :1] = image latent, cond[:, c, 0] = 1), and the SR DiT
as diffusers' HunyuanVideo15Transformer3DModel (MeanFlow: timestep_r) run in float64 with float64 time angles.

Tolerance 1e-5 (relative L2): ours runs in float32 (float32 eps 1.2e-7, a few hundred roundings deep); measured
4e-7..9e-7. A wrong channel order, mask, noise formula or upsampler wiring gives errors of order 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from telefuser.models.hunyuan15 import sr
from telefuser.models.hunyuan15.dit import HunyuanVideo15DiT, HunyuanVideo15DiTConfig
from telefuser.models.hunyuan15.dit_keys import diffusers_to_tencent

diffusers = pytest.importorskip("diffusers")
import diffusers.models.embeddings as dembed  # noqa: E402
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402

TOL = 1e-5
C = 4
SR_DIT = HunyuanVideo15DiTConfig(in_channels=3 * C + 2, out_channels=C, hidden_size=64, heads_num=2, mlp_hidden_dim=256,
                                 double_blocks=2, rope_dim_list=[4, 14, 14], text_states_dim=40, byt5_dim=16,
                                 byt5_hidden=2048, vision_states_dim=24, use_meanflow=True)
UP720 = sr.SRUpsampler720pConfig(in_channels=C, out_channels=C, hidden_channels=8, num_blocks=2)
UP1080 = sr.SRUpsampler1080pConfig(z_channels=C, out_channels=C, block_out_channels=[8, 8], num_res_blocks=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("gamma") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * scale)


def _f64_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                            max_period=10000):
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * timesteps.double()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


def ref_causal_conv(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate"), state[prefix + ".conv.weight"],
                    state[prefix + ".conv.bias"])


def ref_upsampler_720p(x: torch.Tensor, state: dict, num_blocks: int) -> torch.Tensor:
    y = ref_causal_conv(x, state, "in_conv")
    for i in range(num_blocks):
        h = F.silu(ref_causal_conv(y, state, f"blocks.{i}.block.0"))
        h = F.silu(ref_causal_conv(h, state, f"blocks.{i}.block.2"))
        y = y + ref_causal_conv(h, state, f"blocks.{i}.block.4")
    return ref_causal_conv(y, state, "out_conv")


def ref_sr_input(lq, size, up_state, noise, strength, latents, image_latent, t):
    b, c, f, _, _ = lq.shape
    frames = lq.double().permute(0, 2, 1, 3, 4).reshape(b * f, c, *lq.shape[-2:])
    up = F.interpolate(frames, size=size, mode="bilinear", align_corners=False).reshape(b, f, c, *size).permute(0, 2, 1, 3, 4)
    up = ref_upsampler_720p(up, up_state, UP720.num_blocks)
    t_noise = 1000.0 * strength
    lq_noised = (1 - t_noise / 1000.0) * up + (t_noise / 1000.0) * noise.double()
    cond = torch.zeros(b, 2 * c + 2, *latents.shape[2:], dtype=torch.float64)
    cond[:, c + 1: 2 * c + 1] = lq_noised
    cond[:, 2 * c + 1] = 1
    if image_latent is not None:
        cond[:, :c, :1] = image_latent.double()
        cond[:, c, 0] = 1
    if t < 1000 * strength:
        cond[:, c + 1: 2 * c + 1] = 0
        cond[:, 2 * c + 1] = 0
    return torch.cat([latents.double(), cond], 1)


@pytest.mark.parametrize("i2v,t", [(False, 900.0), (True, 900.0), (True, 500.0)], ids=["t2v", "i2v", "i2v-late"])
def test_sr_forward_matches_float64_reference(i2v: bool, t: float, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(5)
    ref_dit = HunyuanVideo15Transformer3DModel(
        in_channels=SR_DIT.in_channels, out_channels=C, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        mlp_ratio=4.0, text_embed_dim=40, text_embed_2_dim=16, image_embed_dim=24, rope_axes_dim=(4, 14, 14),
        use_meanflow=True).eval()
    randomize(ref_dit, 6)
    dit = HunyuanVideo15DiT(SR_DIT).eval()
    dit.load_state_dict(diffusers_to_tencent(ref_dit.state_dict()), strict=True)
    upsampler = sr.SRUpsampler720p(UP720).eval()
    randomize(upsampler, 7, 0.1)

    lq = torch.randn(1, C, 2, 3, 4, generator=gen)
    size = (6, 8)
    latents = torch.randn(1, C, 2, *size, generator=gen)
    noise = torch.randn(1, C, 2, *size, generator=gen)
    image_latent = torch.randn(1, C, 1, *size, generator=gen) if i2v else None
    text = torch.randn(1, 10, 40, generator=gen)
    text_mask = torch.tensor([[1] * 6 + [0] * 4])
    byt5, byt5_mask = torch.randn(1, 4, 16, generator=gen), torch.tensor([[1, 1, 0, 0]])
    vision = torch.randn(1, 5, 24, generator=gen) if i2v else torch.zeros(1, 5, 24)
    timesteps = [t, 300.0]

    up = sr.upsample_lq_latent(lq, size, upsampler)
    noised = sr.noise_lq_latent(up, 0.7, noise=noise)
    condition, zero = sr.sr_condition(latents, noised, image_latent)
    y = sr.sr_condition_for(t, condition, zero, 0.7)
    t_r = torch.tensor([sr.meanflow_t_r(timesteps, 0)])
    with torch.no_grad():
        got = dit(latents, torch.tensor([t]), text, text_mask, byt5, byt5_mask, vision, y=y, t_r=t_r)

    monkeypatch.setattr(dembed, "get_timestep_embedding", _f64_timestep_embedding)
    up_state = {k: v.double() for k, v in upsampler.state_dict().items()}
    x64 = ref_sr_input(lq, size, up_state, noise, 0.7, latents, image_latent, t)
    with torch.no_grad():
        expected = ref_dit.double()(hidden_states=x64, timestep=torch.tensor([t], dtype=torch.float64),
                                    encoder_hidden_states=text.double(), encoder_attention_mask=text_mask,
                                    encoder_hidden_states_2=byt5.double(), encoder_attention_mask_2=byt5_mask,
                                    image_embeds=vision.double(), timestep_r=t_r.double(), return_dict=False)[0]
    assert rel_err(got, expected) < TOL


def _constant_video(value: float, shape=(1, C, 3, 4, 5)) -> torch.Tensor:
    return torch.full(shape, value) + torch.arange(C, dtype=torch.float32).view(1, C, 1, 1, 1) * 0.1


@pytest.mark.parametrize("kind", ["720p", "1080p"])
def test_sr_of_constant_is_constant(kind: str) -> None:
    """Resizing, replicate-padded causal convolutions, RMS norms over channels and residual sums keep a latent
    that is constant in time and space (per channel) constant, whatever the weights."""
    upsampler = sr.SRUpsampler720p(UP720) if kind == "720p" else sr.SRUpsampler1080p(UP1080)
    randomize(upsampler, 8, 0.1)
    out = sr.upsample_lq_latent(_constant_video(0.3), (8, 10), upsampler)
    assert out.shape == (1, C, 3, 8, 10)
    flat = out.flatten(2)
    assert (flat - flat.mean(-1, keepdim=True)).abs().max() < 1e-5 * flat.abs().max()


def test_identity_upsampler_keeps_the_constant_and_noise_zero_keeps_it() -> None:
    upsampler = sr.SRUpsampler720p(sr.SRUpsampler720pConfig(in_channels=C, out_channels=C, hidden_channels=C, num_blocks=1))
    with torch.no_grad():
        for p in upsampler.parameters():
            p.zero_()
        for conv in (upsampler.in_conv.conv, upsampler.out_conv.conv):
            for ch in range(C):
                conv.weight[ch, ch, 2, 1, 1] = 1.0  # the current frame's centre pixel (time is padded before)
    video = _constant_video(-0.4)
    out = sr.noise_lq_latent(sr.upsample_lq_latent(video, (8, 10), upsampler), 0.0, noise=torch.randn(1, C, 3, 8, 10))
    assert torch.allclose(out, video[..., :1, :1].expand(-1, -1, -1, 8, 10), atol=1e-6)
    condition, zero = sr.sr_condition(torch.zeros_like(out), out)
    assert torch.equal(condition[:, C + 1: 2 * C + 1], out) and condition[:, -1].eq(1).all()
    assert not zero[:, C + 1:].any() and torch.equal(zero[:, : C + 1], condition[:, : C + 1])


def test_noise_formula_and_condition_switch() -> None:
    lq, noise = torch.randn(1, C, 1, 2, 2), torch.randn(1, C, 1, 2, 2)
    assert torch.allclose(sr.noise_lq_latent(lq, 0.7, noise=noise), 0.3 * lq + 0.7 * noise)
    cond, zero = torch.ones(1), torch.zeros(1)
    assert sr.sr_condition_for(700.0, cond, zero, 0.7) is cond and sr.sr_condition_for(699.9, cond, zero, 0.7) is zero
    assert sr.meanflow_t_r([900.0, 500.0, 100.0], 1) == 100.0 and sr.meanflow_t_r([900.0, 500.0, 100.0], 2) == 0.0


def _numpy_bucket_map(lr_base: int, hr_base: int, lr_w: int, lr_h: int) -> tuple[int, int]:
    lr, hr = sr.crop_size_buckets(lr_base), sr.crop_size_buckets(hr_base)
    hr_ratios = np.array([float(w) / float(h) for w, h in hr])
    assert (lr_w, lr_h) in lr
    return hr[int(np.abs(hr_ratios - float(lr_w) / float(lr_h)).argmin())]


@pytest.mark.parametrize("index", [None, 20, 45, 60, 75, 100])
def test_sr_sizes_follow_published_buckets(index: int | None) -> None:
    w, h = (848, 480) if index is None else sr.crop_size_buckets(640)[index]
    hh, hw = sr.sr_target_size(h, w, "480p", "720p")
    assert (hw, hh) == _numpy_bucket_map(640, 960, w, h)
    assert hh % 16 == 0 and hw % 16 == 0 and 0.9 < (hh * hw) / (h * w) / 2.25 < 1.1  # 1.5x per side
    if index is None:
        assert (hh, hw) == (720, 1280)
    hh2, hw2 = sr.sr_target_size(hh, hw, "720p", "1080p")
    assert (hw2, hh2) == _numpy_bucket_map(960, 1440, hw, hh)


def test_sr_target_size_refuses_a_non_bucket() -> None:
    with pytest.raises(ValueError, match="not a 480p bucket"):
        sr.sr_target_size(481, 848)


def test_published_sr_dit_and_upsamplers_on_meta() -> None:
    from telefuser.models.hunyuan15.dit import HUNYUAN15_SR_8B

    with torch.device("meta"):
        dit = HunyuanVideo15DiT(HUNYUAN15_SR_8B)
        up = sr.SRUpsampler720p(sr.SRUpsampler720pConfig())
    assert dit.img_in.proj.weight.shape[1] == 98 and hasattr(dit, "time_r_in")
    assert up.in_conv.conv.weight.shape == (64, 32, 3, 3, 3)


def test_closest_bucket_and_cover_crop() -> None:
    from telefuser.models.hunyuan15 import buckets

    assert buckets.closest_bucket(9, 16, "480p") == (480, 848)
    assert buckets.closest_bucket(16, 9, "480p") == (848, 480)
    assert buckets.closest_bucket(9, 16, "720p") == (720, 1280)
    assert buckets.closest_bucket(1, 1, "480p") == (640, 640)
    lst = buckets.crop_size_buckets(640)
    ratios = np.array([round(float(h) / float(w), 5) for h, w in lst])  # the published get_closest_ratio
    for h, w in [(1080, 1920), (1000, 750), (333, 1000)]:
        assert buckets.closest_bucket(h, w) == lst[int(np.abs(ratios - h / w).argmin())]
    (rw, rh), box = buckets.cover_and_crop(1920, 1080, 848, 480)
    assert (rw, rh) == (853, 480) and box == (2.5, 0.0, 850.5, 480.0)


def test_plan_frame_sizes_are_the_buckets_and_the_sr_map_is_the_published_one() -> None:
    """What the compiler records (schema.buckets, schema.resolution.family_frame_size): the T2V size of each aspect
    ratio is closest_bucket's, Wan keeps the table, resolutions without buckets keep the table, and the SR size of a
    base bucket is sr_target_size's (the published BucketMap)."""
    from telefuser.models.hunyuan15 import buckets
    from telefuser.schema.resolution import family_frame_size, frame_size

    for res in ("480p", "720p"):
        for ar in ("16:9", "9:16", "1:1", "4:3", "3:4"):
            w_ratio, h_ratio = (int(v) for v in ar.split(":"))
            h, w = buckets.closest_bucket(h_ratio, w_ratio, res)
            assert family_frame_size("hunyuan_video15_t2v", res, ar) == (w, h)
            assert family_frame_size("hunyuan_video15_i2v", res, ar) == (w, h)
            assert family_frame_size("wan_t2v", res, ar) == frame_size(res, ar)
            if res == "480p":
                sh, sw = sr.sr_target_size(h, w, "480p", "720p")
                assert buckets.sr_bucket_size(w, h, "720p") == (sw, sh)
    assert family_frame_size("hunyuan_video15_t2v", "480p", "16:9") == (848, 480) != frame_size("480p", "16:9")
    assert family_frame_size("hunyuan_video15_t2v", "144p", "16:9") == frame_size("144p", "16:9") == (256, 144)
    assert buckets.sr_bucket_size(848, 480, "720p") == (1280, 720)


def test_a_plan_with_the_1080p_upsampler_runs(tmp_path) -> None:
    """The SR stage with `upsampler/1080p_sr_distilled`'s class (SRTo1080pUpsampler's layout, tiny widths), as
    tiny_hy15_sr.toml's plan: detected from its keys, loaded, and run end to end at the SR frame."""
    from pathlib import Path

    from safetensors.torch import save_file

    import telefuser
    from telefuser.compiler import compile_recipe
    from telefuser.schema.canonical import pretty_json

    from hy15_fixtures import link_tiny_hy15

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    torch.manual_seed(0)
    upsampler = sr.SRUpsampler1080p(sr.SRUpsampler1080pConfig(z_channels=C, out_channels=C, block_out_channels=[8, 8],
                                                              num_res_blocks=1))
    save_file({k: v.contiguous() for k, v in upsampler.state_dict().items()}, str(tmp_path / "up1080.safetensors"))
    link_tiny_hy15(tmp_path)
    recipe = tmp_path / "sr1080.toml"
    recipe.write_text(f'extends = "{recipes / "tiny_hy15_sr.toml"}"\nname = "sr1080"\n\n[[layer1.models]]\n'
                      'name = "sr_upsampler"\nrole = "sr_upsampler"\nclass = "HunyuanVideo15SRUpsampler1080p"\n'
                      f'path = "{tmp_path / "up1080.safetensors"}"\n')
    plan = compile_recipe(recipe)
    assert {m.role: m.class_ for m in plan.layer1_model_definition.models}["sr_upsampler"] == \
        "HunyuanVideo15SRUpsampler1080p"
    path = tmp_path / "plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    video = telefuser.load_plan(str(path)).run(prompt="a fox", seed=1, progress=False)
    assert video.frames.shape == (1, 480, 848, 3) and video.frames.std() > 1.0
