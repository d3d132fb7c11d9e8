"""Wan2.2 image-to-video A14B on the tiny MoE I2V pair (recipes/tiny_wan22_i2v.toml): the plan, the CLI, the expert
switch with the image condition, and the video against diffusers' WanImageToVideoPipeline in its Wan2.2 mode
(`transformer` = high-noise expert, `transformer_2` = low-noise expert, `boundary_ratio`, no image encoder).

Wan2.2's i2v-A14B (wan/configs/wan_i2v_A14B.py): 36-channel experts without img_emb (no CLIP stage), the image
through the Wan2.1 VAE as Wan2.1 I2V's y, boundary 0.900, guide scales (3.5, 3.5), shift 5.0, 40 steps.

Reference tolerance (float32 on both sides, one CPU): every uint8 value of the video within 0.55 of diffusers'
float output x 255, as the other parity tests (0.5 is the rounding; measured 0.501). The parity run sets the
experts' scales apart (4.0 high, 3.0 low) so that a swapped scale or a wrong switch step shows: swapping the two
scales moves the video by up to 176 levels (mean 4.4), switching at 0.8 instead of 0.9 by up to 255 (mean 31).
"""

from __future__ import annotations

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
from telefuser.schema.canonical import pretty_json

from test_i2v import structured_image

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny"
RECIPE = RECIPES / "tiny_wan22_i2v.toml"
PROMPT, NEGATIVE, SEED = "a red fox running through fresh snow", "dark blurry video", 11


def write_plan(folder: Path, overrides: tuple[str, ...] = ()) -> Path:
    plan = folder / f"wan22_i2v_{abs(hash(overrides))}.plan.json"
    plan.write_text(pretty_json(compile_recipe(RECIPE, list(overrides)).model_dump(mode="json", by_alias=True)))
    return plan


def test_plan_has_the_vae_image_path_and_the_moe_phases(tmp_path):
    from telefuser.runtime.plan_io import read_plan

    plan, _ = read_plan(write_plan(tmp_path))
    assert plan.pipeline_type == "wan_i2v"
    assert [s.name for s in plan.stages] == ["load_models", "encode_text", "load_image", "encode_condition",
                                              "prepare_latents", "denoise", "decode_vae", "write_video"]
    stages = {s.name: s for s in plan.stages}
    assert stages["encode_condition"].params == {"condition": "first_frame", "num_frames": 9, "temporal_ratio": 4,
                                                 "spatial_ratio": 8, "mask_channels": 4, "output": "y"}
    denoise = stages["denoise"].params
    assert denoise["conditioning"] == ["y"]  # no CLIP tokens: Wan2.2 has no image encoder
    assert (denoise["boundary"], denoise["boundary_timestep"], stages["denoise"].models) == (0.9, 900.0, ["dit_high", "dit_low"])
    assert [(p["model"], p["cfg_scale"]) for p in denoise["phases"]] == [("dit_high", 3.5), ("dit_low", 3.5)]
    for role in ("dit_high_noise", "dit_low_noise"):
        arch = plan.model(role).arch
        assert arch["in_dim"] == 36 and arch["model_type"] == "t2v" and "image_dim" not in arch
    assert not plan.layer2_inference_config.enable_clip_stage and plan.layer2_inference_config.sigma_shift == 5.0
    assert plan.layer3_user_interface.parameters["image"].required


def test_shipped_a14b_recipe_has_wan22s_i2v_settings():
    from telefuser.compiler.recipe_loader import load_recipe

    recipe = load_recipe(RECIPES / "wan22_i2v_a14b.toml").recipe
    l2 = recipe.layer2
    assert recipe.layer1.pipeline == "wan_i2v" and recipe.layer1.is_moe
    assert (l2.boundary, l2.cfg_scale_high, l2.cfg_scale_low, l2.sigma_shift, l2.num_inference_steps) == (0.9, 3.5, 3.5, 5.0, 40)
    assert (l2.num_frames, l2.fps, l2.enable_clip_stage) == (81, 16, False)
    assert {m.role for m in recipe.layer1.models} == {"dit_high_noise", "dit_low_noise", "vae", "text_encoder", "tokenizer"}
    plan = compile_recipe(RECIPES / "wan22_i2v_a14b.toml", inspect_weights=False)
    assert [s.name for s in plan.stages][2:4] == ["load_image", "encode_condition"]


def test_cli_compiles_and_runs_an_mp4_from_a_png(tmp_path, capsys):
    image = tmp_path / "first.png"
    Image.fromarray(structured_image(400, 300)).save(image)
    plan = tmp_path / "wan22_i2v.plan.json"
    assert compile_main([str(RECIPE), "-o", str(plan)]) == 0
    out = tmp_path / "fox.mp4"
    assert run_main([str(plan), "--image", str(image), "--prompt", PROMPT, "-o", str(out), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    reader = imageio_ffmpeg.read_frames(str(out))
    assert next(reader)["size"] == (256, 144) and sum(1 for _ in reader) == 9


def test_each_expert_gets_its_timesteps_and_the_image_condition(tmp_path):
    from telefuser.runtime.solvers import make_solver

    pipe = telefuser.load_plan(str(write_plan(tmp_path)))
    seen: dict[str, list] = {"dit_high": [], "dit_low": []}
    for name, calls in seen.items():
        pipe.placements[name].module.register_forward_hook(
            lambda m, args, kwargs, out, calls=calls: calls.append((float(args[1]), kwargs["y"].shape)), with_kwargs=True)
    pipe.run(prompt=PROMPT, seed=SEED, image=structured_image(256, 144), progress=False)
    timesteps = make_solver("unipc", 4, 5.0).timesteps.tolist()
    y = torch.Size([1, 20, 3, 18, 32])  # 4 mask + 16 latent channels, 3 latent frames of 144x256 / 8
    assert seen["dit_high"] == [(t, y) for t in timesteps if t >= 900 for _ in range(2)]  # CFG: two calls a step
    assert seen["dit_low"] == [(t, y) for t in timesteps if t < 900 for _ in range(2)]
    assert seen["dit_high"] and seen["dit_low"]


# ------------------------------------------------------------------ against diffusers

diffusers = pytest.importorskip("diffusers")


def diffusers_experts() -> tuple:
    """diffusers' WanTransformer3DModel for each tiny expert (36 channels in, no image embedder) and the tiny
    Wan2.1 VAE as AutoencoderKLWan, from the same files (converted from Wan's layout)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors.torch import load_file

    from telefuser.models.tiny import TINY_ARCH
    from telefuser.models.wan.dit_keys import wan_to_diffusers as dit_to_diffusers
    from telefuser.models.wan.vae_keys import wan_to_diffusers as vae_to_diffusers

    experts = []
    for role in ("dit_wan22_i2v_high", "dit_wan22_i2v_low"):
        d = TINY_ARCH[role]
        transformer = WanTransformer3DModel(
            patch_size=tuple(d["patch_size"]), num_attention_heads=d["num_heads"],
            attention_head_dim=d["dim"] // d["num_heads"], in_channels=d["in_dim"], out_channels=d["out_dim"],
            text_dim=d["text_dim"], freq_dim=d["freq_dim"], ffn_dim=d["ffn_dim"], num_layers=d["num_layers"],
            cross_attn_norm=d["cross_attn_norm"], qk_norm="rms_norm_across_heads", eps=d["eps"])
        state = {k: v.float() for k, v in load_file(str(TINY / f"{role}.safetensors")).items()}  # stored in bf16
        transformer.load_state_dict(dit_to_diffusers(state), strict=True)
        experts.append(transformer.eval())
    v = TINY_ARCH["vae"]
    vae = AutoencoderKLWan(base_dim=v["base_dim"], z_dim=v["z_dim"], dim_mult=v["dim_mult"],
                           num_res_blocks=v["num_res_blocks"], temperal_downsample=v["temporal_downsample"])
    vae.load_state_dict(vae_to_diffusers(load_file(str(TINY / "vae.safetensors"))), strict=True)
    return experts[0], experts[1], vae.eval()


@pytest.mark.slow  # both pipelines, 4 steps each: ~10 s on a 2-core CPU
def test_tiny_wan22_i2v_video_matches_diffusers_pipeline(tmp_path):
    """The whole run against diffusers' WanImageToVideoPipeline with transformer_2 and boundary_ratio 0.9; its
    prompt embeddings from diffusers' WanPipeline (the I2V pipeline calls ftfy, which is not installed here)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    from test_runtime_parity import diffusers_pipeline

    plan_path = write_plan(tmp_path, ("layer2.text_len=512", "layer2.cfg_scale_high=4.0", "layer2.cfg_scale_low=3.0"))
    pixels = structured_image(256, 144, seed=3)
    Image.fromarray(pixels).save(tmp_path / "first.png")
    pipe = telefuser.load_plan(str(plan_path))
    ours = pipe.run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, image=str(tmp_path / "first.png"),
                    progress=False).frames
    l2 = pipe.plan.layer2_inference_config
    text = diffusers_pipeline(pipe.plan.model("text_encoder").arch["vocab_size"])
    high, low, vae = diffusers_experts()
    reference = WanImageToVideoPipeline(
        tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae, transformer=high, transformer_2=low,
        image_encoder=None, image_processor=None, boundary_ratio=l2.boundary,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=l2.sigma_shift))
    positive, negative = text.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                            max_sequence_length=l2.text_len, device=torch.device("cpu"))
    frames = reference(
        image=Image.fromarray(pixels), prompt_embeds=positive, negative_prompt_embeds=negative, height=144, width=256,
        num_frames=l2.num_frames, num_inference_steps=l2.num_inference_steps, guidance_scale=l2.cfg_scale_high,
        guidance_scale_2=l2.cfg_scale_low, generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np").frames[0]
    assert frames.shape == ours.shape == (9, 144, 256, 3)
    diff = np.abs(ours.astype(np.float64) - frames.astype(np.float64) * 255)
    assert diff.max() <= 0.55, diff.max()
