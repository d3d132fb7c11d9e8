"""Wan2.1 image-to-video end to end on the tiny I2V model set: the plan's image stages, the conditioning image
(reading, checking, fitting), the CLI and Python API, and the conditioning and video against diffusers'
WanImageToVideoPipeline on the same weights.

Reference tolerances (float32 on both sides, one CPU):
- y (the 4 mask channels and the 16 latent channels of the VAE encoding of [image, zero frames]) against
  diffusers' `prepare_latents`: the mask exactly, the latents within 1e-5 absolute (two implementations of the
  same causal convolutions, summed in other orders; measured 1.2e-6 on latents of magnitude up to 1.5);
- the CLIP tokens against transformers' CLIPVisionModel (hidden_states[-2]) on Wan's preprocessing: relative
  Frobenius error under 1e-5 (measured 0: the same float32 ops);
- one DiT forward with y and the CLIP tokens against diffusers' WanTransformer3DModel: relative error under
  1e-4 (as tests/test_wan_dit.py: summation order only; measured 3.5e-6). Zeroing y or the CLIP tokens moves
  that output by 0.41 and 1.27 relative, so a dropped or misrouted condition fails every check by far;
- the whole video (4 UniPC steps, CFG 5, the VAE decode): every uint8 value within 0.55 of diffusers' float
  output x 255, as the text-to-video parity test (0.5 is the rounding; measured 0.501).
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

import telefuser
from telefuser.cli.run import main as run_main
from telefuser.compiler import compile_recipe
from telefuser.errors import TeleFuserError
from telefuser.runtime.io.image import MAX_PIXELS, as_image, fit_image, read_image, to_pixels
from telefuser.errors import ParameterError
from telefuser.runtime.io.params import resolve_parameters
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny"
PROMPT, NEGATIVE, SEED = "a red fox running through fresh snow", "dark blurry video", 11


def write_plan(folder: Path, overrides: tuple[str, ...] = (), recipe: Path = RECIPES / "tiny_i2v.toml") -> Path:
    plan = folder / f"i2v_{abs(hash(overrides))}.plan.json"
    plan.write_text(pretty_json(compile_recipe(recipe, list(overrides)).model_dump(mode="json", by_alias=True)))
    return plan


def structured_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields plus a bright square: structure at several scales (not white noise)."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((max(height // 16, 2), max(width // 16, 2), 3)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)).copy()
    image[height // 4: height // 2, width // 3: width // 2] = (250, 240, 30)
    return image


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    return write_plan(tmp_path_factory.mktemp("i2v"))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "first.png"
    Image.fromarray(structured_image(400, 300)).save(path)
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


# ------------------------------------------------------------------ the plan


def test_plan_spells_out_the_image_path(plan):
    from telefuser.runtime.plan_io import read_plan

    compiled, _ = read_plan(plan)
    assert compiled.pipeline_type == "wan_i2v"
    stages = {s.name: s for s in compiled.stages}
    assert [s.name for s in compiled.stages] == [
        "load_models", "encode_text", "load_image", "encode_image", "encode_condition", "prepare_latents", "denoise",
        "decode_vae", "write_video"]
    assert (stages["load_image"].kind, stages["load_image"].params) == (
        "image_load", {"fit": "cover_center_crop", "resample": "lanczos", "value_range": [-1, 1]})
    assert (stages["encode_image"].kind, stages["encode_image"].models) == ("image_encode", ["image_encoder"])
    cond = stages["encode_condition"]
    assert (cond.kind, cond.models) == ("vae_encode", ["vae"])
    assert cond.params == {"condition": "first_frame", "num_frames": 9, "temporal_ratio": 4, "spatial_ratio": 8,
                           "mask_channels": 4, "output": "y"}
    assert stages["denoise"].params["conditioning"] == ["y", "clip_fea"]
    image = compiled.layer3_user_interface.parameters["image"]
    assert image.type == "path" and image.required
    dit, clip = compiled.model("dit"), compiled.model("image_encoder")
    assert dit.arch["model_type"] == "i2v" and dit.arch["in_dim"] == 36 and dit.arch["image_dim"] == clip.arch["dim"] == 32
    assert {k: clip.arch[k] for k in ("image_size", "patch_size", "mlp_dim", "num_heads", "num_layers")} == {
        "image_size": 28, "patch_size": 14, "mlp_dim": 64, "num_heads": 2, "num_layers": 3}
    assert compiled.layer2_inference_config.enable_clip_stage and compiled.layer2_inference_config.sigma_shift == 3.0


def test_explain_shows_the_image_path(plan, capsys):
    from telefuser.cli.compile import main

    assert main(["--explain", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "load_image -> encode_image -> encode_condition -> prepare_latents" in out
    assert "lanczos resize to cover the frame and centre crop" in out
    assert "latents of [image, 8 zero frames] behind a 4-channel first_frame mask -> y" in out
    assert "gets y, clip_fea in both CFG branches" in out
    assert re.search(r"--image +path +required", out)


# ------------------------------------------------------------------ reading and fitting the image


def test_fit_keeps_an_image_of_the_frame_size_exactly():
    pixels = structured_image(256, 144)
    assert np.array_equal(fit_image(as_image(pixels), 256, 144), pixels)


def test_fit_covers_the_frame_and_crops_the_centre():
    """Wan2.2's rule (textimage2video.py): scale = max(W / w, H / h), Lanczos resize, crop the centre."""
    pixels = structured_image(400, 300)  # 4:3 into 16:9: 400x300 -> 256x192, 24 rows cut above and below
    expected = Image.fromarray(pixels).resize((256, 192), Image.Resampling.LANCZOS).crop((0, 24, 256, 168))
    assert np.array_equal(fit_image(as_image(pixels), 256, 144), np.asarray(expected))
    tall = structured_image(150, 600)  # 1:4 into 1:1: 150x600 -> 192x768, rows 288..480 kept
    expected = Image.fromarray(tall).resize((192, 768), Image.Resampling.LANCZOS).crop((0, 288, 192, 480))
    assert np.array_equal(fit_image(as_image(tall), 192, 192), np.asarray(expected))


def test_to_pixels_is_wans_mapping():
    frame = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = to_pixels(frame)
    assert out.shape == (1, 3, 1, 1) and out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp"])
def test_png_jpeg_webp_any_mode_become_rgb(tmp_path, suffix):
    pixels = structured_image(64, 48)
    path = tmp_path / f"x.{suffix}"
    Image.fromarray(pixels).convert("L").save(path)  # greyscale in, RGB out
    image = read_image(path)
    assert image.pixels.shape == (48, 64, 3) and image.pixels.dtype == np.uint8 and image.size == (64, 48)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(pixels).convert("RGBA").save(rgba)
    assert np.array_equal(read_image(rgba).pixels, pixels)


def test_exif_orientation_is_applied(tmp_path):
    pixels = structured_image(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the viewer shows a 32x64 portrait
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert read_image(tmp_path / "phone.jpg").size == (32, 64)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR claims width x height (the pixel data is never reached: the size is refused first)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def bad_image(folder: Path, kind: str) -> Path:
    path = folder / {"missing": "nope.png", "folder": "a_folder", "text": "notes.png", "gif": "anim.gif",
                     "truncated_png": "cut.png", "truncated_jpeg": "cut.jpg", "truncated_webp": "cut.webp",
                     "one_pixel": "dot.png", "thin": "line.png", "huge": "huge.png"}[kind]
    noisy = (np.random.default_rng(1).random((300, 400, 3)) * 255).astype(np.uint8)
    if kind == "folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("not an image at all\n")
    elif kind == "gif":
        Image.fromarray(noisy).save(path)
    elif kind.startswith("truncated"):
        Image.fromarray(noisy).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "one_pixel":
        Image.new("RGB", (1, 1)).save(path)
    elif kind == "thin":
        Image.new("RGB", (300, 15)).save(path)
    elif kind == "huge":
        _png_header_only(path, 9000, 9000)
    return path


BAD = {
    "missing": "no such file",
    "folder": "is a folder, not an image file",
    "text": "is not an image",
    "gif": "is a GIF image; TeleFuser reads PNG, JPEG and WebP",
    "truncated_png": "is damaged or truncated",
    "truncated_jpeg": "is damaged or truncated",
    "truncated_webp": "is damaged or truncated",
    "one_pixel": "is 1x1; each side must be at least 16 pixels",
    "thin": "is 300x15; each side must be at least 16 pixels",
    "huge": f"is 9000x9000 (81.0 megapixels); images over {MAX_PIXELS // 1_000_000} megapixels are refused",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_image_files_are_refused_by_name(tmp_path, kind):
    path = bad_image(tmp_path, kind)
    with pytest.raises(ParameterError) as info:
        read_image(path)
    message = str(info.value)
    assert repr(str(path)) in message and BAD[kind] in message, message


@pytest.mark.parametrize("value,needle", [
    (np.zeros((32, 32, 3), dtype=np.float32), "must be RGB uint8 of shape [height, width, 3], got float32"),
    (np.zeros((32, 32), dtype=np.uint8), "got uint8 [32, 32]"),
    (np.zeros((32, 32, 4), dtype=np.uint8), "got uint8 [32, 32, 4]"),
    (np.zeros((8, 32, 3), dtype=np.uint8), "is 32x8; each side must be at least 16 pixels"),
    (Image.new("RGB", (2, 2)), "image (PIL image) is 2x2"),
    (12, "must be a file path, a PIL image or a numpy array"),
    ("  ", "--image is empty"),
])
def test_bad_in_memory_images_are_refused(value, needle):
    with pytest.raises(ParameterError) as info:
        as_image(value)
    assert needle in str(info.value)


# ------------------------------------------------------------------ the CLI


def test_cli_compiles_and_runs_an_mp4_from_a_png(tmp_path, image_file, capsys):
    from telefuser.cli.compile import main as compile_main

    plan = tmp_path / "i2v.plan.json"
    assert compile_main([str(RECIPES / "tiny_i2v.toml"), "-o", str(plan)]) == 0
    out = tmp_path / "fox.mp4"
    assert run_main([str(plan), "--image", str(image_file), "--prompt", PROMPT, "--aspect-ratio", "1:1",
                     "-o", str(out), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert meta["size"] == (192, 192) and sum(1 for _ in reader) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.mp4", "i2v.plan.json"]


@pytest.mark.parametrize("kind", ["missing", "text", "truncated_png", "one_pixel", "huge"])
def test_cli_refuses_a_bad_image_with_exit_2_and_no_mp4(plan, tmp_path, capsys, kind):
    path = bad_image(tmp_path, kind)
    out = tmp_path / "never.mp4"
    assert run_main([str(plan), "--image", str(path), "--prompt", PROMPT, "-o", str(out)]) == 2
    err = _error(capsys)
    assert str(path) in err and BAD[kind] in err
    assert not list(tmp_path.glob("*.mp4*")) and not list(tmp_path.glob(".never*"))


def test_cli_needs_an_image_on_an_i2v_plan(plan, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_main([str(plan), "--prompt", PROMPT, "-o", str(tmp_path / "x.mp4")])
    assert info.value.code == 2 and "the following arguments are required: --image" in capsys.readouterr().err


def test_cli_refuses_an_image_on_a_t2v_plan(tmp_path, image_file, capsys):
    plan = write_plan(tmp_path, recipe=RECIPES / "tiny.toml")
    assert run_main([str(plan), "--image", str(image_file), "--prompt", PROMPT, "-o", str(tmp_path / "x.mp4")]) == 2
    err = _error(capsys)
    assert f"image {str(image_file)!r} would be ignored" in err and "text-to-video" in err and "drop --image" in err
    assert not (tmp_path / "x.mp4").exists()


def test_python_api_refuses_images_where_they_do_not_belong(plan, tmp_path, image_file):
    from telefuser.runtime.plan_io import read_plan

    i2v, _ = read_plan(plan)
    t2v, _ = read_plan(write_plan(tmp_path, recipe=RECIPES / "tiny.toml"))
    with pytest.raises(ParameterError, match="needs the video's first frame: pass --image PATH"):
        resolve_parameters(i2v, prompt="x")
    with pytest.raises(ParameterError, match="does not take parameter.s. image: it is a wan_t2v"):
        resolve_parameters(t2v, prompt="x", image=np.zeros((32, 32, 3), np.uint8))
    assert resolve_parameters(i2v, prompt="x", image=str(image_file)).image.size == (400, 300)


# ------------------------------------------------------------------ the Python API


def test_path_pil_and_array_give_the_same_video_and_the_image_matters(tmp_path, image_file):
    pipe = telefuser.load_plan(str(write_plan(tmp_path, ("layer2.num_inference_steps=2",))))
    pixels = np.asarray(Image.open(image_file).convert("RGB"))
    runs = [pipe.run(prompt=PROMPT, seed=SEED, image=value, progress=False).frames
            for value in (str(image_file), Image.open(image_file), pixels)]
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])
    other = pipe.run(prompt=PROMPT, seed=SEED, image=structured_image(400, 300, seed=5), progress=False).frames
    assert np.abs(other.astype(int) - runs[0].astype(int)).mean() > 1  # the image conditions the video


# ------------------------------------------------------------------ against diffusers

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _stages_until(pipe, stop: str, image) -> "object":
    """Runs the plan's stages up to (not including) `stop` and returns the RunState."""
    from telefuser.runtime.stages import STAGES, RunState
    from telefuser.runtime.io.video import Timings

    state = RunState(params=resolve_parameters(pipe.plan, prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED,
                                               image=image), timings=Timings(), progress=False)
    with torch.inference_mode():
        for stage in pipe.plan.stages:
            if stage.name == stop:
                break
            STAGES[stage.kind](pipe, state, stage)
    return state


def diffusers_i2v_parts():
    """diffusers' WanTransformer3DModel, transformers' CLIPVisionModel and diffusers' AutoencoderKLWan holding the
    tiny I2V set's weights (converted from Wan's layout)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from telefuser.models.clip.vision_keys import wan_to_hf as clip_to_hf
    from telefuser.models.tiny import TINY_ARCH
    from telefuser.models.wan.dit_keys import wan_to_diffusers as dit_to_diffusers
    from telefuser.models.wan.vae_keys import wan_to_diffusers as vae_to_diffusers

    d, c, v = TINY_ARCH["dit_i2v"], TINY_ARCH["image_encoder"], TINY_ARCH["vae"]
    transformer = WanTransformer3DModel(
        patch_size=tuple(d["patch_size"]), num_attention_heads=d["num_heads"], attention_head_dim=d["dim"] // d["num_heads"],
        in_channels=d["in_dim"], out_channels=d["out_dim"], text_dim=d["text_dim"], freq_dim=d["freq_dim"],
        ffn_dim=d["ffn_dim"], num_layers=d["num_layers"], cross_attn_norm=d["cross_attn_norm"],
        qk_norm="rms_norm_across_heads", eps=d["eps"], image_dim=d["image_dim"], added_kv_proj_dim=d["dim"])
    transformer.load_state_dict(dit_to_diffusers(load_file(str(TINY / "dit_i2v.safetensors"))), strict=True)
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=c["dim"], intermediate_size=c["mlp_dim"], num_attention_heads=c["num_heads"],
        num_hidden_layers=c["num_layers"], image_size=c["image_size"], patch_size=c["patch_size"], hidden_act="gelu",
        layer_norm_eps=c["eps"]))
    hf = clip_to_hf(load_file(str(TINY / "image_encoder.safetensors")))
    missing, unexpected = clip.load_state_dict(hf, strict=False)
    if missing:  # transformers >= 5: a bare CLIPVisionModel, keys without "vision_model."
        clip.load_state_dict({k.removeprefix("vision_model."): t for k, t in hf.items()}, strict=True)
    vae = AutoencoderKLWan(base_dim=v["base_dim"], z_dim=v["z_dim"], dim_mult=v["dim_mult"],
                           num_res_blocks=v["num_res_blocks"], temperal_downsample=v["temporal_downsample"])
    vae.load_state_dict(vae_to_diffusers(load_file(str(TINY / "vae.safetensors"))), strict=True)
    return transformer.eval(), clip.eval(), vae.eval()


def wan_clip_input(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Wan's CLIP preprocessing written out (bicubic to size x size, [-1, 1] -> [0, 1], CLIP mean/std), with
    transformers' copy of the constants."""
    import torch.nn.functional as F
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    x = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False) * 0.5 + 0.5
    return (x - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """Our stages up to the noise on a 256x144 image (no resize), beside diffusers' preparation of the same."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    folder = tmp_path_factory.mktemp("cond")
    pipe = telefuser.load_plan(str(write_plan(folder, ("layer2.text_len=512",))))
    pixels = structured_image(256, 144, seed=3)
    state = _stages_until(pipe, "prepare_latents", pixels)
    transformer, clip, vae = diffusers_i2v_parts()
    reference = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                        scheduler=FlowMatchEulerDiscreteScheduler(), image_encoder=clip)
    image = reference.video_processor.preprocess(Image.fromarray(pixels), height=144, width=256).float()
    with torch.no_grad():
        _, condition = reference.prepare_latents(image, 1, 16, 144, 256, 9, torch.float32, torch.device("cpu"),
                                                 torch.Generator().manual_seed(0))
        embeds = clip(pixel_values=wan_clip_input(image, 28), output_hidden_states=True).hidden_states[-2]
    return pipe, state, condition, embeds, transformer


def test_condition_y_matches_diffusers_prepare_latents(conditioned):
    _, state, condition, _, _ = conditioned
    assert state.y.shape == condition.shape == (1, 20, 3, 18, 32)
    mask, latents = state.y[:, :4], state.y[:, 4:]
    assert torch.equal(mask, condition[:, :4])
    assert torch.equal(mask[:, :, 0], torch.ones_like(mask[:, :, 0])) and not mask[:, :, 1:].any()
    err = (latents - condition[:, 4:]).abs().max().item()
    assert err < 1e-5, err


def test_clip_tokens_match_transformers(conditioned):
    _, state, _, embeds, _ = conditioned
    assert state.clip_fea.shape == embeds.shape == (1, 5, 32)
    rel = ((state.clip_fea - embeds).norm() / embeds.norm()).item()
    assert rel < 1e-5, rel


def test_one_dit_forward_with_the_condition_matches_diffusers(conditioned):
    pipe, state, condition, embeds, transformer = conditioned
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 3, 18, 32, generator=gen)
    context = state.context  # [1, 512, text_dim]: diffusers splits image tokens off after 512 text tokens
    t = torch.tensor([900.0])
    with torch.no_grad(), pipe.dispatch("dit"):
        ours = pipe.placements["dit"].module(x, t, context, clip_fea=state.clip_fea, y=state.y)
        expected = transformer(torch.cat([x, condition], dim=1), t, context, encoder_hidden_states_image=embeds,
                               return_dict=False)[0]
    rel = ((ours - expected).norm() / expected.norm()).item()
    assert rel < 1e-4, rel


@pytest.mark.slow  # both pipelines, 4 steps each: ~10 s on a 2-core CPU
def test_tiny_i2v_video_matches_diffusers_pipeline(tmp_path):
    """The whole run against diffusers' WanImageToVideoPipeline. Its CLIP image embeddings come from
    transformers' CLIPVisionModel on Wan's preprocessing (diffusers would preprocess with CLIPImageProcessor:
    shortest-side resize and centre crop, not what Wan does), its prompt embeddings from diffusers' WanPipeline
    (the I2V pipeline calls ftfy unconditionally, and ftfy is not installed here); everything else is diffusers'."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    from test_runtime_parity import diffusers_pipeline

    plan_path = write_plan(tmp_path, ("layer2.text_len=512",))
    pixels = structured_image(256, 144, seed=3)
    Image.fromarray(pixels).save(tmp_path / "first.png")
    pipe = telefuser.load_plan(str(plan_path))
    ours = pipe.run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, image=str(tmp_path / "first.png"),
                    progress=False).frames
    l2 = pipe.plan.layer2_inference_config
    text = diffusers_pipeline(pipe.plan.model("text_encoder").arch["vocab_size"])
    transformer, clip, vae = diffusers_i2v_parts()
    reference = WanImageToVideoPipeline(
        tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae, transformer=transformer, image_encoder=clip,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=l2.sigma_shift))
    image = reference.video_processor.preprocess(Image.fromarray(pixels), height=144, width=256).float()
    with torch.no_grad():
        embeds = clip(pixel_values=wan_clip_input(image, 28), output_hidden_states=True).hidden_states[-2]
    reference.encode_image = lambda image, device=None: embeds
    positive, negative = text.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                            max_sequence_length=l2.text_len, device=torch.device("cpu"))
    frames = reference(
        image=Image.fromarray(pixels), prompt_embeds=positive, negative_prompt_embeds=negative, height=144, width=256,
        num_frames=l2.num_frames, num_inference_steps=l2.num_inference_steps, guidance_scale=l2.cfg_scale,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").frames[0]
    assert frames.shape == ours.shape == (9, 144, 256, 3)
    diff = np.abs(ours.astype(np.float64) - frames.astype(np.float64) * 255)
    assert diff.max() <= 0.55, diff.max()


# ------------------------------------------------------------------ the compiler's checks


def _i2v_folder(tmp_path: Path, recipe_edit=lambda t: t, clip_state=None) -> Path:
    """tiny_i2v.toml (edited) with its weights, in tmp_path; clip_state replaces the image encoder's file."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(TINY, tmp_path / "tiny")
    if clip_state is not None:
        save_file(clip_state, str(tmp_path / "tiny" / "image_encoder.safetensors"))
    (tmp_path / "tiny.toml").write_text((RECIPES / "tiny.toml").read_text())
    (tmp_path / "tiny_i2v.toml").write_text(recipe_edit((RECIPES / "tiny_i2v.toml").read_text()))
    return tmp_path / "tiny_i2v.toml"


def test_clip_in_hugging_face_layouts_compiles_and_loads(tmp_path):
    from safetensors.torch import load_file

    from telefuser.models.clip.vision_keys import wan_to_hf
    from telefuser.runtime.load.build import build_model
    from telefuser.schema.model_config import ModelRuntimeConfig

    hf = wan_to_hf(load_file(str(TINY / "image_encoder.safetensors")))
    for name, state in (("vision_model.", hf), ("bare (transformers >= 5)", {k.removeprefix("vision_model."): v
                                                                           for k, v in hf.items()})):
        folder = tmp_path / name.split()[0].strip(".")
        folder.mkdir()
        plan = compile_recipe(_i2v_folder(folder, clip_state=state))
        clip = plan.model("image_encoder")
        assert clip.key_layout == "hf" and clip.arch["image_size"] == 28 and clip.arch["num_layers"] == 3, name
        model = build_model(clip, ModelRuntimeConfig(), torch.device("cpu"))
        assert model(torch.zeros(1, 3, 20, 30)).shape == (1, 5, 32)


CLIP_BLOCK = """[[layer1.models]]
name = "image_encoder"
role = "image_encoder"
class = "CLIPVision"
path = "tiny/image_encoder.safetensors"
arch = { num_heads = 2 }

"""


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace("enable_clip_stage = true", "enable_clip_stage = false"),
     "layer1.models has an image_encoder, so the plan runs the CLIP stage: set layer2.enable_clip_stage = true"),
    (lambda t: t.replace("required = true", "required = false"), "layer3.image.required must be true"),
    (lambda t: t.replace('path = "tiny/dit_i2v.safetensors"', 'path = "tiny/dit.safetensors"')
     .replace('arch = { num_heads = 2, model_type = "i2v" }', "arch = { num_heads = 2 }"),
     "feeds DiT 'dit' 36 input channels, but its weights take 16"),
    (lambda t: t.replace(CLIP_BLOCK, "").replace("enable_clip_stage = true\n", ""),
     "attends to CLIP image features (its weights have img_emb: Wan2.1 image-to-video), but layer1.models has no "
     "image_encoder"),
    (lambda t: t.replace('pipeline = "wan_i2v"', 'pipeline = "wan_t2v"'), "layer3.image is only for the wan_i2v pipeline"),
])
def test_compiler_refuses_inconsistent_i2v_recipes(tmp_path, edit, needle):
    recipe = _i2v_folder(tmp_path, edit)
    assert CLIP_BLOCK in (RECIPES / "tiny_i2v.toml").read_text()
    with pytest.raises(TeleFuserError) as info:
        compile_recipe(recipe)
    assert needle in " ".join(str(info.value).split())


def test_a_whole_wan_clip_file_counts_and_loads_its_vision_tower_only(tmp_path):
    """Wan's CLIP file holds the whole XLM-RoBERTa CLIP: the text tower, log_scale and the projection head are
    dropped on loading and left out of the parameter count (and so of the memory estimate)."""
    from safetensors.torch import load_file

    from telefuser.runtime.load.build import build_model
    from telefuser.schema.model_config import ModelRuntimeConfig

    vision = load_file(str(TINY / "image_encoder.safetensors"))
    whole = {**vision, "visual.head": torch.zeros(32, 16), "log_scale": torch.zeros(()),
             "textual.token_embedding.weight": torch.zeros(100, 16), "textual.blocks.0.attn.q.weight": torch.zeros(16, 16)}
    clip = compile_recipe(_i2v_folder(tmp_path, clip_state=whole)).model("image_encoder")
    assert clip.key_layout == "wan" and clip.parameter_count == sum(t.numel() for t in vision.values())
    model = build_model(clip, ModelRuntimeConfig(), torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in vision.items())


def test_compiler_refuses_clip_of_another_width(tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(TINY / "image_encoder.safetensors"))  # headers are all the compiler reads
    wider = {k: torch.zeros([48 if s == 32 else s for s in v.shape]) for k, v in state.items()}
    with pytest.raises(TeleFuserError, match="takes CLIP features of width 32, but image encoder 'image_encoder' produces 48"):
        compile_recipe(_i2v_folder(tmp_path, clip_state=wider))


def test_recipe_rules_for_the_clip_stage():
    from telefuser.compiler import load_recipe
    from telefuser.errors import RecipeError

    with pytest.raises(RecipeError, match="enable_clip_stage = true needs a model with role 'image_encoder'"):
        load_recipe(RECIPES / "tiny.toml", ["layer2.enable_clip_stage=true"])
