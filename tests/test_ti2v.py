"""Wan2.2 TI2V-5B on the tiny TI2V set (recipes/tiny_ti2v.toml: a TI2V-5B-architecture DiT with 48 latent channels
and a tiny Wan2.2 VAE): per-token timesteps in the DiT, the compiler's Wan2.2 VAE detection and checks, the plan,
text-to-video and image-to-video from one plan through the CLI, and both against diffusers on the same weights
(WanPipeline and WanImageToVideoPipeline with `expand_timesteps`, AutoencoderKLWan in its Wan2.2 configuration).

Wan2.2's TI2V (wan/textimage2video.py, wan/utils/utils.py `masks_like`): the image's VAE latent z (one latent
frame) replaces the first frame of the noise, `latent = (1 - mask) * z + mask * latent` with a 0/1 mask that is 0 on
the first latent frame, before the first step and after every step; the DiT's timestep is per token, `mask[:, ::2,
::2] * t`, so the first frame's tokens run at t = 0. diffusers blends the DiT's input instead and the latents only
at the end; for an elementwise solver (UniPC) the two agree on every other frame, and the first frame is z in both.

Reference tolerances (float32 on both sides, one CPU):
- one DiT forward with per-token timesteps against diffusers' WanTransformer3DModel with a [B, S] timestep:
  relative error under 1e-4 (summation order only, as tests/test_wan_dit.py; measured 9e-7); per-token t equal
  everywhere gives exactly the per-video forward;
- the image latent against diffusers' `prepare_latents` (expand_timesteps): within 1e-5 absolute (two
  implementations of the same convolutions; measured 1.4e-6 on latents up to 2.4);
- the whole video, text-to-video and image-to-video: every uint8 value within 0.55 of diffusers' float output x
  255, as the other parity tests (0.5 is the rounding; measured 0.5006 and 0.5003). Giving the first frame's tokens
  t instead of 0 moves the image-to-video by up to 21.6 levels (mean 0.9), the image itself by 49 on average.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

import telefuser
from telefuser.cli.compile import main as compile_main
from telefuser.cli.run import main as run_main
from telefuser.compiler import compile_recipe
from telefuser.errors import TeleFuserError
from telefuser.models.wan.dit import WanDiT, WanDiTConfig
from telefuser.schema.canonical import pretty_json

from test_i2v import _stages_until, structured_image

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny"
RECIPE = RECIPES / "tiny_ti2v.toml"
PROMPT, NEGATIVE, SEED = "a red fox running through fresh snow", "dark blurry video", 11
SIZE = 192  # 144p 1:1, the tiny recipe's frame: sides in multiples of 32 (16x VAE x 2x2 patch)


def write_plan(folder: Path, overrides: tuple[str, ...] = (), recipe: Path = RECIPE) -> Path:
    plan = folder / f"ti2v_{abs(hash((overrides, str(recipe))))}.plan.json"
    plan.write_text(pretty_json(compile_recipe(recipe, list(overrides)).model_dump(mode="json", by_alias=True)))
    return plan


# ------------------------------------------------------------------ the DiT with per-token timesteps

CONFIG = WanDiTConfig(in_dim=48, out_dim=48, dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=2, num_layers=2)


def _dit() -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _first_frame_t(t: float, frames: int, h: int, w: int) -> torch.Tensor:
    per_token = torch.full((1, frames * h * w), t)
    per_token[:, : h * w] = 0.0
    return per_token


def test_per_token_timesteps_equal_everywhere_give_the_per_video_forward():
    model = _dit()
    x, context = torch.randn(1, 48, 3, 6, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        assert torch.equal(model(x, torch.full((1, 36), 700.0), context), model(x, torch.tensor([700.0]), context))
        with pytest.raises(ValueError, match=r"per-token timesteps must be \[batch, tokens\] = \[1, 36\], got \[1, 35\]"):
            model(x, torch.full((1, 35), 700.0), context)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_per_token_modulation_through_the_triton_kernels():
    """The modulation views a per-token e gives (strided: a token's 6 vectors lie together) through the fused
    norm-modulate and gated-add kernels, as on a GPU, against the native ops (float32: 2e-5 relative, as
    tests/test_kernels_triton.py)."""
    from telefuser.ops.dispatch import use_dispatch

    model = _dit()
    x, context = torch.randn(1, 48, 3, 6, 8), torch.randn(1, 7, 32)
    t = _first_frame_t(700.0, 3, 3, 4)
    ops = ("rms_norm", "layer_norm", "modulate", "norm_modulate", "rotary", "gated_add")
    with torch.no_grad():
        with use_dispatch({op: "torch" for op in ops}):
            native = model(x, t, context)
        with use_dispatch({op: "triton" for op in ops}):
            kernels = model(x, t, context)
    rel = ((kernels - native).norm() / native.norm()).item()
    assert rel < 2e-5, rel


diffusers = pytest.importorskip("diffusers")


def test_per_token_forward_matches_diffusers():
    from diffusers import WanTransformer3DModel

    from telefuser.models.wan.dit_keys import wan_to_diffusers

    model = _dit()
    reference = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=48, out_channels=48, text_dim=32,
        freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    reference.load_state_dict(wan_to_diffusers(model.state_dict()), strict=True)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 48, 3, 6, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    t = _first_frame_t(700.0, 3, 3, 4)
    with torch.no_grad():
        ours, expected = model(x, t, context), reference(x, t, context, return_dict=False)[0]
        per_video = model(x, torch.tensor([700.0]), context)
    rel = ((ours - expected).norm() / expected.norm()).item()
    assert rel < 1e-4, rel
    assert ((ours - per_video).norm() / per_video.norm()).item() > 1e-2  # the first frame's t = 0 matters


# ------------------------------------------------------------------ the compiler


def test_plan_of_the_tiny_ti2v_set(tmp_path):
    from telefuser.runtime.plan_io import read_plan

    plan, _ = read_plan(write_plan(tmp_path))
    assert plan.pipeline_type == "wan_ti2v"
    vae, dit = plan.model("vae"), plan.model("dit")
    assert (vae.class_, vae.key_layout) == ("Wan22VAE", "wan")
    assert vae.arch == {"z_dim": 48, "base_dim": 4, "decoder_base_dim": 4, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                        "temporal_downsample": [False, True, True], "patch_size": 2}
    assert (dit.arch["in_dim"], dit.arch["out_dim"], dit.arch["model_type"]) == (48, 48, "t2v")
    stages = {s.name: s for s in plan.stages}
    assert [s.name for s in plan.stages] == ["load_models", "encode_text", "load_image", "encode_condition",
                                              "prepare_latents", "denoise", "decode_vae", "write_video"]
    assert stages["load_image"].params == {"fit": "cover_center_crop", "resample": "lanczos", "value_range": [-1, 1],
                                           "optional": True}
    assert stages["encode_condition"].params == {"condition": "image_latent", "num_frames": 1, "temporal_ratio": 4,
                                                 "spatial_ratio": 16, "output": "image_latent", "optional": True}
    assert stages["prepare_latents"].params == {"num_frames": 9, "latent_channels": 48, "temporal_ratio": 4,
                                                "spatial_ratio": 16, "generator": "cpu"}
    assert stages["denoise"].params["first_frame"] == "image_latent" and "conditioning" not in stages["denoise"].params
    image = plan.layer3_user_interface.parameters["image"]
    assert image.type == "path" and not image.required
    assert plan.memory.at["tokens"] == 3 * 6 * 6  # 3 latent frames of 192 / 16 / 2 = 6 x 6 patches


def test_shipped_5b_recipe_has_wan22s_ti2v_settings():
    from telefuser.compiler.recipe_loader import load_recipe

    recipe = load_recipe(RECIPES / "wan22_ti2v_5b.toml").recipe
    l2, l3 = recipe.layer2, recipe.layer3
    assert recipe.layer1.pipeline == "wan_ti2v"
    assert (l2.num_inference_steps, l2.cfg_scale, l2.sigma_shift, l2.num_frames, l2.fps) == (50, 5.0, 5.0, 121, 24)
    assert l3.resolution.default == "704p" and not l3.image.required
    plan = compile_recipe(RECIPES / "wan22_ti2v_5b.toml", inspect_weights=False)
    sizes = plan.layer3_user_interface.frame_sizes["704p"]
    assert sizes == {"16:9": [1280, 704], "9:16": [704, 1280]}
    noise = next(s for s in plan.stages if s.kind == "noise")
    assert (noise.params["latent_channels"], noise.params["spatial_ratio"]) == (48, 16)


def test_explain_shows_the_first_frame_path(tmp_path, capsys):
    assert compile_main(["--explain", str(write_plan(tmp_path))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "without --image the run is text-to-video" in out
    assert "vae: latent of the image alone (one latent frame, 16x smaller) -> image_latent" in out
    assert "image_latent replaces the first latent frame before and after every step; its tokens get timestep 0" in out
    assert "--image path optional" in out


def _ti2v_folder(tmp_path: Path, edit=lambda t: t) -> Path:
    shutil.copytree(TINY, tmp_path / "tiny")
    (tmp_path / "r.toml").write_text(edit(RECIPE.read_text()))
    return tmp_path / "r.toml"


def test_the_wan22_vae_in_diffusers_layout_compiles_and_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    from telefuser.models.wan.vae22_keys import wan_to_diffusers
    from telefuser.runtime.load.build import build_model
    from telefuser.schema.model_config import ModelRuntimeConfig

    recipe = _ti2v_folder(tmp_path)
    wan = load_file(str(TINY / "vae22.safetensors"))
    save_file(wan_to_diffusers(wan), str(tmp_path / "tiny" / "vae22.safetensors"))
    vae = compile_recipe(recipe).model("vae")
    assert (vae.class_, vae.key_layout) == ("Wan22VAE", "diffusers")
    assert vae.arch == compile_recipe(RECIPE).model("vae").arch
    model = build_model(vae, ModelRuntimeConfig(), torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in wan.items())


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace('class = "Wan22VAE"\npath = "tiny/vae22.safetensors"', 'class = "WanVAE"\npath = "tiny/vae.safetensors"'),
     "DiT 'dit' outputs 48 latent channels, but VAE 'vae' (WanVAE) decodes 16: these weights belong to different "
     "models (a 48-channel DiT is Wan2.2 TI2V-5B's: it takes the Wan2.2 VAE, Wan2.2_VAE.pth)"),
    (lambda t: t.replace("tiny/dit_ti2v.safetensors", "tiny/dit.safetensors"),
     "DiT 'dit' outputs 16 latent channels, but VAE 'vae' (Wan22VAE) decodes 48"),
    (lambda t: t.replace('class = "Wan22VAE"', 'class = "WanVAE"'),
     "class = 'WanVAE', but"),
    (lambda t: t.replace('choices = ["1:1"]', 'choices = ["1:1", "16:9"]'),
     "resolution 144p at aspect ratio 16:9 is 256x144, but this plan's frames must have sides in multiples of 32 x 32 "
     "(the VAE's 16x spatial compression x the DiT's 2x2 patch)"),
    (lambda t: t.replace('pipeline = "wan_ti2v"', 'pipeline = "wan_i2v"').replace("required = false", "required = true"),
     "feeds DiT 'dit' 100 input channels, but its weights take 48"),
])
def test_compiler_refuses_what_does_not_fit(tmp_path, edit, needle):
    compile_recipe(_ti2v_folder(tmp_path / "as_shipped"))
    recipe = _ti2v_folder(tmp_path, edit)
    with pytest.raises(TeleFuserError) as info:
        compile_recipe(recipe)
    assert needle in " ".join(str(info.value).split())


def test_image_required_false_is_for_ti2v_only(tmp_path):
    text = (RECIPES / "tiny_i2v.toml").read_text().replace("required = true", "required = false")
    shutil.copytree(TINY, tmp_path / "tiny")
    (tmp_path / "tiny.toml").write_text((RECIPES / "tiny.toml").read_text())
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(TeleFuserError, match="only a wan_ti2v plan, whose one checkpoint also makes text-to-video"):
        compile_recipe(tmp_path / "r.toml")


# ------------------------------------------------------------------ running: CLI and API


def test_cli_makes_text_to_video_and_image_to_video_from_one_plan(tmp_path, capsys):
    plan = tmp_path / "ti2v.plan.json"
    assert compile_main([str(RECIPE), "-o", str(plan)]) == 0
    image = tmp_path / "first.png"
    Image.fromarray(structured_image(400, 300)).save(image)
    for name, extra in (("t2v.mp4", []), ("i2v.mp4", ["--image", str(image)])):
        out = tmp_path / name
        assert run_main([str(plan), "--prompt", PROMPT, "-o", str(out), "--no-progress", *extra]) == 0
        reader = imageio_ffmpeg.read_frames(str(out))
        meta = next(reader)
        assert meta["size"] == (SIZE, SIZE) and meta["fps"] == 24 and sum(1 for _ in reader) == 9
    assert "wrote" in capsys.readouterr().out


def test_image_run_holds_the_first_latent_frame_and_its_tokens_at_t_0(tmp_path):
    pipe = telefuser.load_plan(str(write_plan(tmp_path)))
    seen = []
    pipe.placements["dit"].module.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    state = _stages_until(pipe, "decode_vae", structured_image(SIZE, SIZE, seed=2))
    assert state.image_latent.shape == (1, 48, 1, 12, 12)
    assert torch.equal(state.latents[:, :, :1], state.image_latent)  # replaced after the last step
    assert len(seen) == 8 and all(t.shape == (1, 108) for t in seen)  # 4 steps x CFG, 3 x 6 x 6 tokens
    for t in seen:
        assert not t[:, :36].any() and (t[:, 36:] == t[0, 36]).all() and t[0, 36] > 0
    seen.clear()
    text_only = _stages_until(pipe, "decode_vae", None)  # no image: text-to-video, a timestep per video
    assert text_only.image_latent is None and all(t.shape == (1,) for t in seen)


# ------------------------------------------------------------------ against diffusers


def diffusers_ti2v_parts() -> tuple:
    """diffusers' WanTransformer3DModel (48 channels) and AutoencoderKLWan with the Wan2.2 options, holding the tiny
    TI2V set's weights (stored in bfloat16, converted from Wan's layout)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors.torch import load_file

    from telefuser.models.tiny import TINY_ARCH
    from telefuser.models.wan.dit_keys import wan_to_diffusers as dit_to_diffusers
    from telefuser.models.wan.vae22 import LATENT_MEAN, LATENT_STD
    from telefuser.models.wan.vae22_keys import wan_to_diffusers as vae_to_diffusers

    d, v = TINY_ARCH["dit_ti2v"], TINY_ARCH["vae22"]
    transformer = WanTransformer3DModel(
        patch_size=tuple(d["patch_size"]), num_attention_heads=d["num_heads"], attention_head_dim=d["dim"] // d["num_heads"],
        in_channels=d["in_dim"], out_channels=d["out_dim"], text_dim=d["text_dim"], freq_dim=d["freq_dim"],
        ffn_dim=d["ffn_dim"], num_layers=d["num_layers"], cross_attn_norm=d["cross_attn_norm"],
        qk_norm="rms_norm_across_heads", eps=d["eps"])
    transformer.load_state_dict(dit_to_diffusers({k: t.float() for k, t in load_file(str(TINY / "dit_ti2v.safetensors")).items()}),
                                strict=True)
    vae = AutoencoderKLWan(base_dim=v["base_dim"], decoder_base_dim=v["decoder_base_dim"], z_dim=v["z_dim"],
                           dim_mult=v["dim_mult"], num_res_blocks=v["num_res_blocks"],
                           temperal_downsample=v["temporal_downsample"], is_residual=True, in_channels=12,
                           out_channels=12, patch_size=v["patch_size"], scale_factor_spatial=16, scale_factor_temporal=4,
                           latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD))
    vae.load_state_dict(vae_to_diffusers({k: t.float() for k, t in load_file(str(TINY / "vae22.safetensors")).items()}),
                        strict=True)
    return transformer.eval(), vae.eval()


def _scheduler(shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=shift)


def test_image_latent_matches_diffusers_prepare_latents(tmp_path):
    from diffusers import WanImageToVideoPipeline

    pipe = telefuser.load_plan(str(write_plan(tmp_path)))
    pixels = structured_image(SIZE, SIZE, seed=3)
    state = _stages_until(pipe, "prepare_latents", pixels)
    transformer, vae = diffusers_ti2v_parts()
    reference = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                        scheduler=_scheduler(5.0), image_encoder=None, expand_timesteps=True)
    image = reference.video_processor.preprocess(Image.fromarray(pixels), height=SIZE, width=SIZE).float()
    with torch.no_grad():
        _, condition, mask = reference.prepare_latents(image, 1, 48, SIZE, SIZE, 9, torch.float32, torch.device("cpu"),
                                                       torch.Generator().manual_seed(0))
    assert condition.shape == state.image_latent.shape == (1, 48, 1, 12, 12)
    assert not mask[:, :, 0].any() and mask[:, :, 1:].all()
    err = (state.image_latent - condition).abs().max().item()
    assert err < 1e-5, err


@pytest.mark.slow  # both pipelines, 4 steps each, twice: ~10 s on a 2-core CPU
def test_tiny_ti2v_videos_match_diffusers(tmp_path):
    """Text-to-video against diffusers' WanPipeline(expand_timesteps=True), image-to-video against its
    WanImageToVideoPipeline(expand_timesteps=True), on the same tiny weights; prompt embeddings from WanPipeline
    (the I2V pipeline calls ftfy, which is not installed here)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    from test_runtime_parity import diffusers_pipeline

    pipe = telefuser.load_plan(str(write_plan(tmp_path, ("layer2.text_len=512",))))
    l2 = pipe.plan.layer2_inference_config
    pixels = structured_image(SIZE, SIZE, seed=3)
    Image.fromarray(pixels).save(tmp_path / "first.png")
    text = diffusers_pipeline(pipe.plan.model("text_encoder").arch["vocab_size"])
    positive, negative = text.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                            max_sequence_length=l2.text_len, device=torch.device("cpu"))
    transformer, vae = diffusers_ti2v_parts()
    common = dict(prompt_embeds=positive, negative_prompt_embeds=negative, height=SIZE, width=SIZE,
                  num_frames=l2.num_frames, num_inference_steps=l2.num_inference_steps, guidance_scale=l2.cfg_scale,
                  output_type="np")
    t2v = WanPipeline(tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae, transformer=transformer,
                      scheduler=_scheduler(l2.sigma_shift), expand_timesteps=True)
    i2v = WanImageToVideoPipeline(tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae,
                                  transformer=transformer, scheduler=_scheduler(l2.sigma_shift), image_encoder=None,
                                  image_processor=None, expand_timesteps=True)
    runs = {
        "text-to-video": (pipe.run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, progress=False).frames,
                          t2v(generator=torch.Generator("cpu").manual_seed(SEED), **common).frames[0]),
        "image-to-video": (pipe.run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, image=str(tmp_path / "first.png"),
                                    progress=False).frames,
                           i2v(image=Image.fromarray(pixels), generator=torch.Generator("cpu").manual_seed(SEED),
                               **common).frames[0]),
    }
    for what, (ours, frames) in runs.items():
        assert frames.shape == ours.shape == (9, SIZE, SIZE, 3), what
        diff = np.abs(ours.astype(np.float64) - frames.astype(np.float64) * 255)
        assert diff.max() <= 0.55, (what, diff.max())
    t2v_frames, i2v_frames = runs["text-to-video"][0], runs["image-to-video"][0]
    assert np.abs(t2v_frames.astype(int) - i2v_frames).mean() > 1  # the image conditions the video


# ------------------------------------------------------------------ on several ranks

DRIVER = (
    "import os, sys, numpy as np, telefuser\n"
    "video = telefuser.load_plan(sys.argv[1]).run(prompt=sys.argv[2], seed=int(sys.argv[3]), image=sys.argv[5], "
    "progress=False)\n"
    "if video is not None:\n"
    "    np.save(sys.argv[4], video.frames)\n"
)
LAYOUTS = {"ulysses2": ["sp_ulysses_degree=2"], "ring2": ["sp_ring_degree=2"], "tp2": ["tp_degree=2"],
           "cfg2": ["cfg_degree=2"]}


@pytest.fixture(scope="module")
def ranks_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti2v_ranks")
    image = folder / "first.png"
    Image.fromarray(structured_image(300, 200, seed=4)).save(image)
    frames = telefuser.load_plan(str(write_plan(folder))).run(prompt=PROMPT, seed=SEED, image=str(image),
                                                               progress=False).frames
    return image, frames


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_image_to_video_on_two_ranks_gives_the_one_rank_video(layout, ranks_reference, tmp_path, monkeypatch):
    """The image latent is made on rank 0 and broadcast; under Ulysses and ring the per-token modulation is sharded
    with the tokens; under tp and cfg every rank holds it whole."""
    from telefuser.distributed.launch import run_local_ranks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    image, reference = ranks_reference
    overrides = ("target.num_devices=2", *(f"layer2.parallel_config.{d}" for d in LAYOUTS[layout]))
    plan = write_plan(tmp_path, overrides)
    out = tmp_path / "frames.npy"
    assert run_local_ranks([sys.executable, "-c", DRIVER, str(plan), PROMPT, str(SEED), str(out), str(image)], 2) == 0
    diff = np.abs(np.load(out).astype(int) - reference.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"{layout}: max {diff.max()}, differing {(diff > 0).mean()}"


def test_vae_parallel_decodes_the_wan22_latent_as_one_rank_tiled(ranks_reference, tmp_path, monkeypatch):
    """enable_vae_parallel with the Wan2.2 VAE: the tiles (in its patch space) shared over 2 ranks give the one-rank
    tiled decode's video (12 x 12 latent, tiles of 8 every 6: 2 x 2 tiles)."""
    from telefuser.distributed.launch import run_local_ranks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    image, _ = ranks_reference
    tiles = "layer2.tile_size=[8, 8]"
    single = write_plan(tmp_path, ("layer2.tiled=true", tiles))
    expected = telefuser.load_plan(str(single)).run(prompt=PROMPT, seed=SEED, image=str(image), progress=False).frames
    plan = write_plan(tmp_path, ("target.num_devices=2", "layer2.parallel_config.sp_ulysses_degree=2", tiles,
                                 "layer2.enable_vae_parallel=true"))
    decode = next(s for s in json.loads(plan.read_text())["stages"] if s["kind"] == "vae_decode")
    assert decode["params"]["parallel_ranks"] == 2 and decode["params"]["tiled"]
    out = tmp_path / "frames.npy"
    assert run_local_ranks([sys.executable, "-c", DRIVER, str(plan), PROMPT, str(SEED), str(out), str(image)], 2) == 0
    diff = np.abs(np.load(out).astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"max {diff.max()}, differing {(diff > 0).mean()}"
