"""HunyuanVideo-1.5 image-to-video with the super-resolution stage (recipes/tiny_hy15_i2v_sr.toml,
compiler/hunyuan15_sr.py, runtime stages image_load / hy15_image_encode / hy15_sr).

The published I2V SR stage (tencent/HunyuanVideo-1.5 hyvideo/pipelines/hunyuan_video_sr_pipeline.py, called by
hunyuan_video_pipeline.py with the user's reference image) conditions the SR DiT on the reference image encoded again
at the SR size:
- condition latent: the image resized to cover the SR frame with a Lanczos resize (scale = max(W / w, H / h), sizes
  rounded), centre-cropped (torchvision's CenterCrop: offset round((size - target) / 2)), mapped to [-1, 1], VAE
  encoded (posterior mode times scaling_factor) at latent frame 0, zeros after; task mask 1 at frame 0 only
  (`get_image_condition_latents(task, image, sr_height, sr_width)`, `_prepare_cond_latents`); these channels stay
  when the low-resolution channels are zeroed (t < 1000 lq_noise_strength: `zero_lq_condition`);
- the SR DiT's image tokens: SigLIP of the image fitted to the SR resolution (`_prepare_vision_states`).
The checks below evaluate that formula independently here (PIL, float64 copies of the tiny VAE and SigLIP) and compare
it with what the runtime hands the SR DiT. The SR DiT's forward on such inputs is checked against a float64
evaluation of the published forward in tests/test_hy15_sr.py ("i2v", "i2v-late").

Tolerance: relative L2 1e-5 between the runtime's float32 tensors and the float64 evaluation: the tiny VAE encoder
and SigLIP are a few dozen float32 operations deep (eps 6e-8 each, so ~1e-6 expected; measured 5.9e-7 for the latent,
6.6e-7 for SigLIP's tokens). What the bound must catch is far larger: the crop one row off moves the latent by 0.37,
a bicubic instead of a Lanczos resize by 0.12, SigLIP's tokens of the base frame's fit differ from the SR frame's
by 1.3e-2 (all measured on these tiny weights). The masks and the low-resolution channels are compared exactly
(constants and copies written into the tensor).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import telefuser
from telefuser.cli.compile import main as compile_main
from telefuser.cli.run import main as run_main
from telefuser.compiler import compile_recipe
from telefuser.errors import RecipeError
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny_hy15"
RECIPE = RECIPES / "tiny_hy15_i2v_sr.toml"
PROMPT, SEED = 'the sign turns to read "OPEN"', 3
SR_W, SR_H = 848, 480  # tiny_hy15_i2v_sr: base 144p 16:9 (256x144) -> the 480p bucket of that ratio
# the recipe's default is "auto" (tests/test_hy15_auto_sr.py runs it); these runs keep 16:9, whose SR frame
# 424x300 covers exactly (below)
FIXED = "layer3.aspect_ratio.default=16:9"
TOL = 1e-5
# 424x300 covers 848x480 at scale 2 exactly (848x600), so the crop offset (60 rows) is the same whichever way a
# half pixel would round: the comparison tests the formula, not a rounding convention
IMAGE_SIZE = (424, 300)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _image() -> np.ndarray:
    w, h = IMAGE_SIZE
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(11)
    smooth = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1)  # gradients + noise: not flat
    return np.clip(smooth + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def _plan(tmp_path: Path, *overrides: str) -> Path:
    path = tmp_path / "i2v_sr.plan.json"
    plan = compile_recipe(RECIPE, [FIXED, *overrides])
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return path


def _model(filename: str, class_name: str, arch: dict) -> torch.nn.Module:
    from safetensors.torch import load_file

    from telefuser.models import registry

    entry = registry.get(class_name)
    state = load_file(str(TINY / filename))
    model = entry.model_class(entry.config_class(**arch))
    model.load_state_dict(entry.convert(state, entry.detect_layout(state.keys())), strict=True)
    return model.eval()


def _published_sr_pixels(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """[1, 3, height, width] float64 in [-1, 1]: Tencent's get_image_condition_latents preprocessing, written out."""
    from PIL import Image

    pil = Image.fromarray(image)
    ow, oh = pil.size
    scale = max(width / ow, height / oh)
    rw, rh = int(round(ow * scale)), int(round(oh * scale))
    resized = pil.resize((rw, rh), Image.LANCZOS)
    top, left = int(round((rh - height) / 2.0)), int(round((rw - width) / 2.0))
    crop = np.asarray(resized, dtype=np.float64)[top:top + height, left:left + width] / 255.0
    return ((torch.from_numpy(crop).permute(2, 0, 1)[None] - 0.5) / 0.5).contiguous()


# ------------------------------------------------------------------ the plan


def test_plan_stages_refusal_gone_and_memory_covers_the_sr_encode() -> None:
    plan = compile_recipe(RECIPE)
    assert plan.pipeline_type == "hunyuan_video15_i2v"
    assert [s.name for s in plan.stages] == [
        "load_models", "encode_glyphs", "encode_text", "load_image", "encode_image", "prepare_latents", "denoise",
        "load_image_sr", "encode_image_sr", "upsample_latent", "super_resolve", "decode_vae", "write_video"]
    st = {s.name: s for s in plan.stages}
    assert st["load_image_sr"].kind == "image_load"
    assert st["load_image_sr"].params["frame_sizes"]["256x144"] == [SR_W, SR_H]  # base frame -> SR frame
    assert st["load_image_sr"].params["output"] == "sr_image"
    assert (st["encode_image_sr"].kind, st["encode_image_sr"].models) == ("hy15_image_encode", ["image_encoder", "vae"])
    assert st["encode_image_sr"].params["outputs"] == ["sr_vision_states", "sr_image_latent"]
    assert st["super_resolve"].params["condition"] == "i2v" and st["super_resolve"].models == ["dit_sr"]
    # the T2V SR plan keeps its stages, its SR stage conditioned as T2V
    t2v = compile_recipe(RECIPES / "tiny_hy15_sr.toml")
    assert "load_image_sr" not in [s.name for s in t2v.stages]
    assert next(s for s in t2v.stages if s.kind == "hy15_sr").params["condition"] == "t2v"
    # memory: the VAE encoding one image at the SR frame (10 maps of the encoder's first level, 4 channels in the tiny
    # VAE, float32) and the float32 image, beside SigLIP's activations
    # at the largest SR frame of any base frame ("auto"'s candidates included: 192x192 -> 640x640)
    b = plan.memory.breakdown
    w, h = max(st["load_image_sr"].params["frame_sizes"].values(), key=lambda s: s[0] * s[1])
    assert (w, h) == (640, 640)
    assert b["activations.vae_encode_sr"] == 10 * 4 * w * h * 4 + 3 * w * h * 4
    peaks = {s.stage: s for s in plan.memory.stages}
    assert peaks["encode_image_sr"].components["activations"] == b["activations.image_encode"] + b["activations.vae_encode_sr"]
    # the base frame's encode keeps the base frame's workspace (the decode's term is the SR frame's now)
    assert peaks["encode_image"].components["activations"] == b["activations.image_encode"] + b["activations.vae_encode"]
    assert b["activations.vae_encode"] < b["activations.vae_decode"]


@pytest.mark.parametrize("recipe, overrides, needle", [
    # the I2V plan with SR switched on but no SR models
    ("tiny_hy15_i2v", ["layer2.enable_sr=true"], "needs the SR stage's models: role 'dit_sr'"),
    ("tiny_hy15_i2v_sr", ["layer2.enable_sr=false"], "layer2.enable_sr is false"),
    ("tiny_hy15_i2v_sr", ["layer2.sr_config.cfg_scale=3.0"], "guidance-distilled"),
    ("tiny_hy15_i2v_sr", ["layer2.enable_clip_stage=false"], "enable_clip_stage"),
])
def test_bad_combinations_exit_2_with_a_clear_message(recipe, overrides, needle, tmp_path, capsys) -> None:
    sets = [a for o in overrides for a in ("--set", o)]
    code = compile_main([str(RECIPES / f"{recipe}.toml"), *sets, "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "p.json").exists()
    assert needle in " ".join(err.split()), err
    with pytest.raises(RecipeError):
        compile_recipe(RECIPES / f"{recipe}.toml", overrides)


def test_the_old_refusal_is_gone(capsys) -> None:
    """The I2V plan with the SR models compiles (`--check`), and no message says the I2V SR stage is not built."""
    assert compile_main(["--check", str(RECIPE)]) == 0
    out = capsys.readouterr()
    assert "not built" not in out.out + out.err


# ------------------------------------------------------------------ the run


def test_tiny_i2v_sr_runs_end_to_end_and_writes_the_sr_size(tmp_path, capsys) -> None:
    import imageio_ffmpeg
    from PIL import Image

    plan = _plan(tmp_path, "layer2.num_frames=5")
    image = tmp_path / "first.png"
    Image.fromarray(_image()).save(image)
    out = tmp_path / "sign.mp4"
    assert run_main([str(plan), "--image", str(image), "--prompt", PROMPT, "--seed", str(SEED), "-o", str(out),
                     "--no-progress"]) == 0
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert meta["size"] == (SR_W, SR_H) and meta["fps"] == 8
    assert sum(1 for _ in reader) == 5
    capsys.readouterr()
    assert compile_main(["--explain", str(plan)]) == 0
    explain = " ".join(capsys.readouterr().out.split())
    assert "load_image_sr image_load --image, lanczos resize to cover the SR frame (144x192 -> 544x720," in explain
    assert "256x144 -> 848x480)" in explain  # base frame -> SR frame, one per base frame the plan may generate
    assert "encode_image_sr hy15_image_encode image_encoder, vae: SigLIP tokens of the SR-size fitted image" in explain
    assert "I2V: the image latent at that size at latent frame 0 + its SigLIP tokens" in explain


def test_sr_dit_gets_the_reference_image_encoded_at_the_sr_frame(tmp_path, monkeypatch) -> None:
    """What the runtime hands the SR DiT against the published formula evaluated here in float64."""
    from telefuser.models.hunyuan15 import sr as sr_module
    from telefuser.models.hunyuan15.dit import HunyuanVideo15DiT

    plan_path = _plan(tmp_path, "layer2.num_frames=5")
    pipe = telefuser.load_plan(str(plan_path))
    calls = []  # (t, t_r, vision_states, y) of every DiT call
    forward = HunyuanVideo15DiT.forward

    def recording(self, x, t, *args, y=None, t_r=None, **kw):
        vision = args[4] if len(args) > 4 else kw.get("vision_states")
        calls.append((float(t[0]), t_r, None if vision is None else vision.detach().clone(), y.detach().clone()))
        return forward(self, x, t, *args, y=y, t_r=t_r, **kw)

    monkeypatch.setattr(HunyuanVideo15DiT, "forward", recording)
    seen = {}
    sr_condition = sr_module.sr_condition

    def recording_condition(latents, lq, image_latent=None):
        seen["lq"] = lq.detach().clone()
        return sr_condition(latents, lq, image_latent)

    monkeypatch.setattr(sr_module, "sr_condition", recording_condition)
    image = _image()
    video = pipe.run(prompt=PROMPT, seed=SEED, image=image, progress=False)
    assert video.frames.shape == (5, SR_H, SR_W, 3) and video.frames.std() > 1.0

    models = {m.role: m for m in pipe.plan.layer1_model_definition.models}
    vae = _model("hy15_vae.safetensors", "HunyuanVideo15VAE", models["vae"].arch).double()
    siglip = _model("hy15_image_encoder.safetensors", "SigLIPVision", models["image_encoder"].arch).double()
    pixels = _published_sr_pixels(image, SR_W, SR_H)
    with torch.no_grad():
        latent = vae.encode(pixels[:, :, None])  # [1, C, 1, 30, 53]: the posterior mean x scaling_factor
        size = (siglip.config.image_size,) * 2
        vision = siglip(F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1))
    c = latent.shape[1]
    assert latent.shape[-2:] == (SR_H // 16, SR_W // 16)

    sr_calls = [call for call in calls if call[1] is not None]  # MeanFlow t_r: the SR DiT
    base_calls = [call for call in calls if call[1] is None]
    assert len(sr_calls) == 3 and len(base_calls) == 6  # 3 SR steps; 3 base steps x 2 CFG branches
    lq = seen["lq"]
    for t, _, got_vision, y in sr_calls:
        assert y.shape == (1, 2 * c + 2, 2, SR_H // 16, SR_W // 16)  # [condition latent, mask, lq, lq mask]
        # the condition latent: the image's latent at frame 0, zeros after; the task mask 1 at frame 0 only
        assert rel_err(y[:, :c, :1], latent) < TOL
        assert not y[:, :c, 1:].any()
        assert torch.equal(y[:, c, 0], torch.ones_like(y[:, c, 0])) and not y[:, c, 1:].any()
        # the low-resolution channels until t < 1000 x 0.7, zeros (and their mask) after; the image's stay
        if t >= 700.0:
            assert torch.equal(y[:, c + 1:2 * c + 1], lq) and torch.equal(y[:, 2 * c + 1], torch.ones_like(y[:, 0]))
        else:
            assert not y[:, c + 1:].any()
        assert rel_err(got_vision, vision) < TOL
    assert sorted(t for t, *_ in sr_calls) == [500.0, 800.0, 1000.0]  # shift 2 over linspace(1, 0, 4)[:-1]
    # the base DiT got SigLIP's tokens of the base frame's fit (256x144), not the SR frame's
    assert rel_err(base_calls[0][2], vision) > 1e-3
    assert base_calls[0][3].shape[-2:] == (144 // 16, 256 // 16)
