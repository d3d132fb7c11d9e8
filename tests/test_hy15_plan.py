"""HunyuanVideo-1.5 through recipe -> compiler -> plan -> runtime on the tiny weights in recipes/tiny_hy15/.

The runtime's frames are compared with the composition of tests/test_hy15_pipeline_parity.py (which matches
diffusers' HunyuanVideo15Pipeline / HunyuanVideo15ImageToVideoPipeline to 1e-5 on the frames): the same modules
built from the same files outside the runtime, the prompt through `text.tokenize_rendered` and Qwen2.5-VL /
byT5, the seeded CPU noise, the CFG flow-matching Euler loop over HunyuanVideo-1.5's shifted linspace grid, the VAE
decode, uint8 as the runtime writes frames. Tolerance: at most 1 level of 255 on any pixel (a float32 rounding that
crosses a .5 boundary) and a mean absolute difference under 0.01 levels; measured: bitwise equal (the runtime does
the same float32 operations in the same order). The SR stage is checked the same way against the composition of
`models.hunyuan15.sr`'s pieces (tested against a float64 evaluation of Tencent's SR forward in test_hy15_sr.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.compiler.memory import RIFE_BYTES_PER_PAIR_PIXEL
from telefuser.errors import RecipeError
from telefuser.schema.canonical import pretty_json
from telefuser.schema.buckets import sr_bucket_size

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny_hy15"
PROMPT, NEGATIVE, SEED = 'A red "STOP" sign in the rain', "blurry", 7


def _load(tmp_path, recipe: str, *overrides: str):
    plan = tmp_path / f"{recipe}.plan.json"
    compiled = compile_recipe(RECIPES / f"{recipe}.toml", overrides)
    plan.write_text(pretty_json(compiled.model_dump(mode="json", by_alias=True)))
    return compiled, telefuser.load_plan(str(plan))


def _model(role_file: str, class_name: str, arch: dict):
    from safetensors.torch import load_file

    from telefuser.models import registry

    entry = registry.get(class_name)
    state = load_file(str(TINY / role_file))
    model = entry.model_class(entry.config_class(**arch))
    model.load_state_dict(entry.convert(state, entry.detect_layout(state.keys())), strict=True)
    return model.eval()


def _reference(plan, prompt: str, negative: str, seed: int, width: int, height: int, image=None) -> np.ndarray:
    """The parity composition on the plan's files and numbers, frames as uint8 [F, H, W, 3]."""
    from tokenizers import Tokenizer

    from telefuser.models.hunyuan15 import sr, text
    from telefuser.models.hunyuan15.dit import condition_latents
    from telefuser.runtime.solvers import make_solver

    models = {m.role: m for m in plan.layer1_model_definition.models}
    build = {r: _model(Path(m.path).name, m.class_, m.arch) for r, m in models.items() if r != "tokenizer"}
    tok = Tokenizer.from_file(models["tokenizer"].path)
    l2 = plan.layer2_inference_config

    def encode(p: str, glyphs: bool):
        ids, mask, crop = text.tokenize_rendered(lambda s: tok.encode(s, add_special_tokens=False).ids, [p],
                                                 tok.token_to_id("<|endoftext|>"), max_length=l2.text_len)
        states = build["text_encoder"](ids, mask)[:, crop:]
        g = text.glyph_text(p) if glyphs else None
        if g is None:
            return states, mask[:, crop:], None, None
        gids, gmask = text.byt5_ids(g, 256)
        return states, mask[:, crop:], build["glyph_encoder"](gids, gmask), gmask

    with torch.no_grad():
        cond, uncond = encode(prompt, True), encode(negative, False)
        vae, dit = build["vae"], build["dit"]
        gen = torch.Generator().manual_seed(seed)
        c = vae.config.latent_channels
        latents = torch.randn(1, c, (l2.num_frames - 1) // 4 + 1, height // 16, width // 16, generator=gen)
        vision, image_latent = None, None
        if image is not None:
            siglip = build["image_encoder"]
            vision = siglip(siglip.preprocess(image))
            image_latent = vae.encode(image[:, :, None])
        y = condition_latents(latents, image_latent)
        steps, shift, scale = l2.num_inference_steps, l2.sigma_shift, l2.cfg_scale
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1].astype(np.float32)
        sigmas = torch.cat([torch.from_numpy(shift * sigmas / (1 + (shift - 1) * sigmas)), torch.zeros(1)])
        x = latents.clone()
        solver = None if l2.sample_solver == "euler" else make_solver(str(l2.sample_solver), steps, shift)
        for i in range(steps):
            t = (sigmas[i] * 1000.0).reshape(1) if solver is None else solver.timesteps[i].reshape(1)
            v_c = dit(x, t, *cond, vision, y=y)
            v_u = dit(x, t, *uncond, vision, y=y)
            v = v_u + scale * (v_c - v_u)
            x = x + (sigmas[i + 1] - sigmas[i]) * v if solver is None else solver.step(v, t[0], x)
        if l2.enable_sr:
            s = l2.lq_noise_strength
            sr_cfg = l2.sr_config
            tw, th = sr_bucket_size(width, height, str(sr_cfg.target_resolution))  # the published BucketMap
            up = sr.upsample_lq_latent(x, (th // 16, tw // 16), build["sr_upsampler"])
            noised = sr.noise_lq_latent(up, s, noise=torch.randn(up.shape, generator=gen))
            hr = torch.randn(up.shape, generator=gen)
            condition, zero = sr.sr_condition(hr, noised)
            sig = np.linspace(1.0, 0.0, sr_cfg.num_inference_steps + 1)[:-1].astype(np.float32)
            sh = sr_cfg.sigma_shift
            sig = torch.cat([torch.from_numpy(sh * sig / (1 + (sh - 1) * sig)), torch.zeros(1)])
            ts = (sig[:-1] * 1000.0).tolist()
            for i in range(sr_cfg.num_inference_steps):
                v = build["dit_sr"](hr, (sig[i] * 1000.0).reshape(1), *cond, None,
                                    y=sr.sr_condition_for(ts[i], condition, zero, s),
                                    t_r=torch.tensor([sr.meanflow_t_r(ts, i)]))
                hr = hr + (sig[i + 1] - sig[i]) * v
            x = hr
        video = vae.decode(x)
    pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().numpy()


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_tiny_t2v_plan_frames_equal_the_parity_composition(tmp_path) -> None:
    plan, pipe = _load(tmp_path, "tiny_hy15")
    assert plan.pipeline_type == "hunyuan_video15_t2v"
    assert [s.kind for s in plan.stages] == ["load", "hy15_glyph_encode", "hy15_text_encode", "noise", "hy15_denoise",
                                             "vae_decode", "write_video"]
    video = pipe.run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, progress=False)
    assert video.frames.shape == (5, 144, 256, 3) and video.frames.std() > 1.0
    _close(video.frames, _reference(plan, PROMPT, NEGATIVE, SEED, 256, 144))


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_tiny_t2v_plan_with_another_solver_equals_the_composition(solver, tmp_path) -> None:
    """UniPC / DPM++ 2M (runtime/solvers, tested against diffusers' schedulers in tests/test_solvers.py) over their
    own grid, as Wan's stage runs them: the plan's frames against the composition stepping the same solver."""
    plan = compile_recipe(RECIPES / "tiny_hy15.toml", [f"layer2.sample_solver={solver}"])
    denoise = next(s for s in plan.stages if s.kind == "hy15_denoise").params
    assert (denoise["solver"], denoise["grid"]) == (solver, "solver_shifted")
    path = tmp_path / "plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    video = telefuser.load_plan(str(path)).run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, progress=False)
    _close(video.frames, _reference(plan, PROMPT, NEGATIVE, SEED, 256, 144))


def test_tiny_plan_compiles_the_published_numbers_and_refuses_what_is_not_built(tmp_path) -> None:
    plan = compile_recipe(RECIPES / "tiny_hy15.toml")
    classes = {m.role: m.class_ for m in plan.layer1_model_definition.models}
    assert classes == {"dit": "HunyuanVideo15DiT", "vae": "HunyuanVideo15VAE", "text_encoder": "Qwen25VLTextEncoder",
                       "tokenizer": "Qwen25VLTokenizer", "glyph_encoder": "ByT5Encoder"}
    denoise = next(s for s in plan.stages if s.kind == "hy15_denoise")
    assert denoise.params["grid"] == "linspace_1_0_shifted" and denoise.params["cfg"]
    refusals = {
        "layer2.parallel_config.tp_degree=2 layer2.models.dit.offload_config.offload_type=MODEL_CPU_OFFLOAD":
            "tensor-parallel weights stay",
        "layer2.parallel_config.sp_ulysses_degree=4": "does not divide the 2 attention heads of model 'dit'",
        "layer2.sample_solver=lcm": "own timesteps",
        "layer2.models.glyph_encoder.offload_config.offload_type=ASYNC_CPU_OFFLOAD": "streams the repeated blocks",
        "layer2.models.dit.quant_config.quant_type=fp8_e4m3fn": "needs a CUDA GPU",  # built, for a CUDA target
        "layer2.models.dit.attention_config.sparse_config.dense_timesteps=10": "SSTA",
        "layer2.enable_sr=true": "needs the SR stage's models",
        "layer2.lq_noise_strength=0.7": "needs layer2.enable_sr",
    }
    for override, message in refusals.items():
        extra = {"tp_degree": ["target.num_devices=2"], "sp_ulysses": ["target.num_devices=4"]}
        extra = next((v for k, v in extra.items() if k in override), [])
        with pytest.raises(Exception) as info:
            compile_recipe(RECIPES / "tiny_hy15.toml", [*override.split(" "), *extra])
        assert message in str(info.value), (override, str(info.value))
    with pytest.raises(RecipeError, match="HunyuanVideo-1.5"):
        compile_recipe(RECIPES / "tiny_hy15.toml", ["layer1.pipeline=wan_t2v"])


def test_tiny_i2v_plan_frames_equal_the_parity_composition(tmp_path) -> None:
    """The image (already the frame's size: no resize) through the runtime's image_load, SigLIP and the VAE encoder."""
    from telefuser.runtime.io.image import as_image, fit_image, to_pixels

    plan, pipe = _load(tmp_path, "tiny_hy15_i2v")
    assert [s.kind for s in plan.stages] == ["load", "hy15_glyph_encode", "hy15_text_encode", "image_load",
                                             "hy15_image_encode", "noise", "hy15_denoise", "vae_decode", "write_video"]
    pixels = np.random.default_rng(4).integers(0, 256, (144, 256, 3), dtype=np.uint8)
    video = pipe.run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, image=pixels, progress=False)
    image = to_pixels(fit_image(as_image(pixels), 256, 144))
    _close(video.frames, _reference(plan, PROMPT, NEGATIVE, SEED, 256, 144, image=image))


def test_tiny_sr_plan_frames_equal_the_composition_of_the_sr_pieces(tmp_path) -> None:
    """Base denoise at 144p -> super_resolve to 480p (upsampler, lq noise 0.7, 3 MeanFlow Euler steps of shift 2) ->
    decode; one frame."""
    plan, pipe = _load(tmp_path, "tiny_hy15_sr")
    kinds = [s.kind for s in plan.stages]
    assert kinds == ["load", "hy15_glyph_encode", "hy15_text_encode", "noise", "hy15_denoise", "hy15_sr_upsample",
                     "hy15_sr", "vae_decode", "write_video"]
    up, sr = (next(s for s in plan.stages if s.kind == k) for k in ("hy15_sr_upsample", "hy15_sr"))
    assert up.models == ["sr_upsampler"] and up.params["frame_sizes"]["256x144"] == [848, 480]
    assert sr.models == ["dit_sr"] and sr.params["lq_noise_strength"] == 0.7 and sr.params["num_inference_steps"] == 3
    assert {s.stage for s in plan.memory.stages} >= {"denoise", "upsample_latent", "super_resolve", "decode_vae"}
    video = pipe.run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, progress=False)
    assert video.frames.shape == (1, 480, 848, 3) and video.frames.std() > 1.0
    _close(video.frames, _reference(plan, PROMPT, NEGATIVE, SEED, 256, 144))


def test_python_api_pipeline_config_with_sr_compiles_like_the_recipe(tmp_path) -> None:
    """telefuser.core.config.HunyuanVideo15PipelineConfig (the design's name, = Layer2) with enable_sr builds the
    plan the TOML recipe does."""
    from telefuser.compiler import load_recipe
    from telefuser.core.config import HunyuanVideo15PipelineConfig, Recipe, SRConfig

    toml = load_recipe(RECIPES / "tiny_hy15_sr.toml").recipe
    layer2 = HunyuanVideo15PipelineConfig(
        sample_solver="euler", num_inference_steps=3, num_frames=1, fps=8, cfg_scale=6.0, sigma_shift=5.0, text_len=64,
        enable_sr=True, lq_noise_strength=0.7,
        sr_config=SRConfig(num_inference_steps=3, sigma_shift=2.0, target_resolution="480p"))
    assert layer2 == toml.layer2
    recipe = Recipe(name="tiny_hy15_sr", description=toml.description, target=toml.target, layer1=toml.layer1,
                    layer2=layer2, layer3=toml.layer3)
    assert compile_recipe(recipe, base_dir=RECIPES).stages == compile_recipe(RECIPES / "tiny_hy15_sr.toml").stages


SHIPPED = ("hunyuan15_t2v_480p", "hunyuan15_t2v_720p", "hunyuan15_i2v_480p_step_distilled", "hunyuan15_t2v_480p_sr_720p",
           "hunyuan15_t2v_720p_ulysses4_cfg2", "hunyuan15_i2v_480p_sr_720p", "hunyuan15_t2v_720p_sparse",
           "hunyuan15_i2v_720p_sparse", "hunyuan15_i2v_480p", "hunyuan15_i2v_720p", "hunyuan15_t2v_720p_sr_1080p",
           "hunyuan15_t2v_480p_sr_720p_vfi", "hunyuan15_t2v_480p_taehv")


def test_shipped_recipes_compile_on_the_published_files_headers(tmp_path, monkeypatch) -> None:
    """The shipped recipes against files with the published names, shapes and sizes (headers only): detection, the
    published architecture numbers, the stages, both DiTs in the memory estimate, within an H100 / H200."""
    from bench.compile import write_vfi_root
    from bench.hy15_files import write_hunyuan15_root

    write_hunyuan15_root(tmp_path)
    write_vfi_root(tmp_path)  # RIFE v4.26's flownet.pkl and taehv1_5.pth, for the VFI and TAEHV recipes
    monkeypatch.setenv("TELEFUSER_MODEL_ROOT", str(tmp_path))
    plans = {name: compile_recipe(RECIPES / f"{name}.toml") for name in SHIPPED}
    for name, plan in plans.items():
        models = {m.role: m for m in plan.layer1_model_definition.models}
        assert models["dit"].arch["hidden_size"] == 2048 and models["dit"].arch["double_blocks"] == 54, name
        assert 8.3e9 < models["dit"].parameter_count < 8.4e9, name
        assert models["text_encoder"].arch["num_layers"] == 28 and models["glyph_encoder"].key_layout == "glyph"
        # Qwen2.5-VL: the 26 layers run (hidden_states[-3]), not the LM head, final norm or last two layers
        assert 6.5e9 < models["text_encoder"].parameter_count < 6.7e9, name
        vae = models["vae"].arch  # HunyuanVideo-1.5's VAE, or taehv1_5's decoder
        assert (vae["latent_channels"], vae["spatial_ratio"]) == (32, 16) if "latent_channels" in vae else \
            (vae["z_dim"], vae["patch_size"]) == (32, 2), name
        assert plan.memory.peak_bytes < plan.memory.capacity_bytes, name
    sr = plans["hunyuan15_t2v_480p_sr_720p"]
    assert [s.name for s in sr.stages][4:8] == ["denoise", "upsample_latent", "super_resolve", "decode_vae"]
    assert {"weights.dit", "weights.dit_sr", "activations.dit", "activations.dit_sr"} <= set(sr.memory.breakdown)
    assert sr.memory.breakdown["activations.dit_sr"] > sr.memory.breakdown["activations.dit"]  # 720p tokens
    # Tencent's buckets, not TeleFuser's table: 480p 16:9 is 848x480 (the table's 832x480), the SR frame 1280x720
    assert plans["hunyuan15_t2v_480p"].layer3_user_interface.frame_sizes["480p"]["16:9"] == [848, 480]
    assert sr.layer3_user_interface.frame_sizes["480p"]["16:9"] == [848, 480]
    assert next(s for s in sr.stages if s.kind == "hy15_sr_upsample").params["frame_sizes"]["848x480"] == [1280, 720]
    assert plans["hunyuan15_t2v_720p"].layer3_user_interface.frame_sizes["720p"]["16:9"] == [1280, 720]
    # the estimate sees the buckets: the largest is 1:1's 640x640 (the table's 624x624)
    assert sr.layer3_user_interface.frame_sizes["480p"]["1:1"] == [640, 640]
    assert (sr.memory.at["width"], sr.memory.at["height"]) == (640, 640)
    # a 24 GiB GPU: the compiler names the whole-model offload of both DiTs, which fits (one DiT on the device at a time)
    with pytest.raises(Exception, match="dit_sr.offload_config.offload_type=MODEL_CPU_OFFLOAD"):
        compile_recipe(RECIPES / "hunyuan15_t2v_480p_sr_720p.toml", ["target.gpu=RTX4090"])
    fits = compile_recipe(RECIPES / "hunyuan15_t2v_480p_sr_720p.toml", [
        "target.gpu=RTX4090", "layer2.models.dit.offload_config.offload_type=MODEL_CPU_OFFLOAD",
        "layer2.models.dit_sr.offload_config.offload_type=MODEL_CPU_OFFLOAD"])
    assert fits.memory.peak_bytes <= fits.memory.capacity_bytes
    usp = plans["hunyuan15_t2v_720p_ulysses4_cfg2"]  # 8 ranks: a quarter of the 720p tokens' activations each
    assert usp.mesh.world_size == 8 and usp.placement_of("dit").parallelized
    assert usp.memory.breakdown["activations.dit"] * 4 == pytest.approx(plans["hunyuan15_t2v_720p"].memory.breakdown[
        "activations.dit"], rel=1e-3)
    assert next(s for s in usp.stages if s.kind == "vae_decode").params["parallel_ranks"] == 8
    i2v_sr = plans["hunyuan15_i2v_480p_sr_720p"]  # the image again at the 720p SR frame for the SR DiT
    assert [s.name for s in i2v_sr.stages][6:11] == ["denoise", "load_image_sr", "encode_image_sr", "upsample_latent",
                                                     "super_resolve"]
    assert next(s for s in i2v_sr.stages if s.name == "load_image_sr").params["frame_sizes"]["848x480"] == [1280, 720]
    assert i2v_sr.memory.breakdown["activations.vae_encode_sr"] > 0
    assert i2v_sr.layer2_inference_config.sigma_shift == 7.0  # the step-distilled transformer's published shift
    sparse = plans["hunyuan15_t2v_720p_sparse"]  # SSTA as released: 6 x 6 x 10 tiles at 720p 121f, top-k halved
    ssta = next(s for s in sparse.stages if s.kind == "hy15_denoise").params["sparse_attention"]["dit"]
    assert ssta["effective"] == {"tile_size": [6, 8, 8], "win_size": [3, 3, 3], "ssta_topk": 32}
    assert ssta["density_grid"] == [31, 45, 80] and ssta["density"] == pytest.approx(59 * 360 / 360**2, abs=0.01)
    assert sparse.layer2_inference_config.cfg_scale == 1.0
    i2v_sparse = plans["hunyuan15_i2v_720p_sparse"]  # the I2V one: shift 7, the 720p buckets picked from the image
    assert i2v_sparse.layer2_inference_config.sigma_shift == 7.0
    assert i2v_sparse.layer1_model_definition.models[0].attributes.distill
    assert i2v_sparse.layer3_user_interface.frame_sizes["720p"]["16:9"] == [1280, 720]
    assert "sparse_attention" in next(s for s in i2v_sparse.stages if s.kind == "hy15_denoise").params
    hd = plans["hunyuan15_t2v_720p_sr_1080p"]  # 720p -> 1080p: the 1080p upsampler, 8 SR steps, the 1080p bucket
    assert next(s for s in hd.stages if s.kind == "hy15_sr_upsample").params["frame_sizes"]["1280x720"] == [1904, 1072]
    assert next(s for s in hd.stages if s.kind == "hy15_sr").params["num_inference_steps"] == 8
    for name, shift in (("hunyuan15_i2v_480p", 5.0), ("hunyuan15_i2v_720p", 7.0)):  # PIPELINE_CONFIGS, with CFG 6
        l2 = plans[name].layer2_inference_config
        assert (l2.cfg_scale, l2.sigma_shift, l2.num_inference_steps) == (6.0, shift, 50), name
        assert not plans[name].layer1_model_definition.models[0].attributes.distill, name
    vfi = plans["hunyuan15_t2v_480p_sr_720p_vfi"]  # RIFE on the 720p SR frames: 121 at 24 fps -> 241 at 48
    assert [s.kind for s in vfi.stages][-3:] == ["vae_decode", "vfi", "write_video"]
    interpolate = next(s for s in vfi.stages if s.kind == "vfi")
    assert (interpolate.params["input_frames"], interpolate.params["output_frames"], interpolate.params["fps"]) == (
        121, 241, 48)
    # the workspace at the largest SR frame (not the base frame), padded to RIFE's 128, 8 pairs per batch
    up = next(s for s in vfi.stages if s.kind == "hy15_sr_upsample").params["frame_sizes"]
    w, h = max((tuple(v) for v in up.values()), key=lambda s: s[0] * s[1])
    padded = -(-w // 128) * 128 * (-(-h // 128) * 128)
    assert vfi.memory.breakdown["activations.vfi"] == 8 * padded * RIFE_BYTES_PER_PAIR_PIXEL + 241 * w * h * 3
    assert vfi.memory.peak_bytes < vfi.memory.capacity_bytes
    taehv = plans["hunyuan15_t2v_480p_taehv"]  # the preview decoder, 4 latent frames per call, in less memory
    assert next(s for s in taehv.stages if s.kind == "vae_decode").params["decoder"] == "taehv"
    assert taehv.memory.breakdown["activations.vae_decode"] < plans["hunyuan15_t2v_480p"].memory.breakdown[
        "activations.vae_decode"]
    i2v = plans["hunyuan15_i2v_480p_step_distilled"]
    assert i2v.layer1_model_definition.models[0].attributes.distill
    assert [s.kind for s in i2v.stages][3:5] == ["image_load", "hy15_image_encode"]
