"""The memory estimator's arithmetic (telefuser/compiler/memory.py) on the tiny models, recomputed here by hand:
every component from the architecture numbers, the largest allowed frame and the parameters in the weight files;
each stage the sum of its components; the plan's peak the largest stage. The constants themselves (VAE_LIVE_MAPS,
FP8_FFN_EXTRA, the workspace) are calibrated on an H100 by bench/memory.py (docs/benchmarks.md, "Memory modes");
these tests check that the compiler applies them as documented. Integer arithmetic: equality is exact."""

from __future__ import annotations

from safetensors import safe_open

from compiler_fixtures import TINY
from telefuser.compiler import compile_recipe
from telefuser.compiler.memory import FP8_FFN_EXTRA, VAE_LIVE_MAPS, WORKSPACE_BYTES
from telefuser.models.tiny import TINY_ARCH

RECIPE = TINY.parent / "tiny.toml"
GPU = ["target.device=cuda", "target.gpu=H100"]
F32 = 4
WIDTH, HEIGHT, FRAMES, TEXT_LEN = 832, 480, 9, 64  # tiny.toml's largest choice: 480p 16:9; num_frames, text_len


def parameters(name: str) -> int:
    with safe_open(TINY / f"{name}.safetensors", "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dit_tokens() -> int:
    latent_frames = (FRAMES - 1) // 4 + 1  # the Wan VAE: 4x in time, 8x in space; the DiT's patch 1 x 2 x 2
    return latent_frames * (HEIGHT // 16) * (WIDTH // 16)


def by_stage(plan) -> dict[str, dict[str, int]]:
    return {s.stage: s.components for s in plan.memory.stages}


def test_every_component_of_the_tiny_plan_by_hand():
    plan = compile_recipe(RECIPE, overrides=GPU)
    dit, vae, t5 = TINY_ARCH["dit"], TINY_ARCH["vae"], TINY_ARCH["text_encoder"]
    weights = {name: parameters(name) * F32 for name in ("dit", "vae", "text_encoder")}
    breakdown = plan.memory.breakdown
    assert {k: breakdown[f"weights.{k}"] for k in weights} == weights
    assert plan.memory.at["tokens"] == dit_tokens()
    # per token: residual stream, normalised FFN input, FFN hidden before and after its activation
    dit_act = dit_tokens() * (2 * dit["dim"] + 2 * dit["ffn_dim"]) * F32
    assert breakdown["activations.dit"] == dit_act
    # VAE_LIVE_MAPS maps of one latent frame's 4 output frames at base_dim channels, plus the float32 video
    vae_act = VAE_LIVE_MAPS * 4 * vae["base_dim"] * WIDTH * HEIGHT * F32 + FRAMES * 3 * WIDTH * HEIGHT * F32
    assert breakdown["activations.vae_decode"] == vae_act
    # CFG: prompt and negative prompt in one batch; residual stream + FFN hidden, float32 scores per head
    t5_act = 2 * TEXT_LEN * (2 * t5["dim"] + t5["dim_ffn"]) * F32 + 2 * t5["num_heads"] * TEXT_LEN**2 * F32
    resident = sum(weights.values())
    expected = {
        "encode_text": {"resident": resident, "activations": t5_act, "workspace": WORKSPACE_BYTES},
        "denoise": {"resident": resident, "activations": dit_act, "workspace": WORKSPACE_BYTES},
        "decode_vae": {"resident": resident, "activations": vae_act, "workspace": WORKSPACE_BYTES},
    }
    assert by_stage(plan) == expected
    assert {s.stage: s.peak_bytes for s in plan.memory.stages} == {k: sum(v.values()) for k, v in expected.items()}
    assert plan.memory.peak_bytes == max(sum(v.values()) for v in expected.values())


def test_fp8_linears_count_one_byte_and_the_quantised_hidden_layer():
    plain = compile_recipe(RECIPE, overrides=GPU)
    fp8 = compile_recipe(RECIPE, overrides=[*GPU, "layer2.models.dit.quant_config.quant_type=fp8_e4m3fn"])
    assert fp8.memory.breakdown["weights.dit"] == parameters("dit")
    extra = fp8.memory.breakdown["activations.dit"] - plain.memory.breakdown["activations.dit"]
    assert extra == dit_tokens() * FP8_FFN_EXTRA * TINY_ARCH["dit"]["ffn_dim"]


def test_an_offloaded_model_counts_only_in_its_stage_and_one_read_at_load_only_until_its_first_use_ends():
    offloaded = [f'layer2.models.{m}.offload_config.offload_type=MODEL_CPU_OFFLOAD' for m in ("dit", "text_encoder")]
    plan = compile_recipe(RECIPE, overrides=[*GPU, *offloaded])
    weights = {name: parameters(name) * F32 for name in ("dit", "vae", "text_encoder")}
    stages = by_stage(plan)
    assert all(c["resident"] == weights["vae"] for c in stages.values())
    assert stages["encode_text"]["in_use.text_encoder"] == weights["text_encoder"]
    assert stages["denoise"]["in_use.dit"] == weights["dit"]
    assert "in_use.dit" not in stages["decode_vae"] and "in_use.text_encoder" not in stages["decode_vae"]
    # the text encoder is read to the device at load for its first use (encode_text), whose end drops it
    at_load = next(d for d in plan.memory.prefetch if d.model == "text_encoder")
    assert at_load.prefetch and at_load.during_model is None and at_load.during_stage == "load_models"
    encode = stages["encode_text"]
    assert at_load.peak_bytes == encode["resident"] + weights["text_encoder"] + encode["activations"] + WORKSPACE_BYTES
    assert not any(k.startswith("loaded_at_start") for c in stages.values() for k in c)
    # the DiT is copied in during the text encoder's use: both on the device in that stage
    assert encode["prefetch.dit"] == weights["dit"]
    assert plan.memory.peak_bytes == max(s.peak_bytes for s in plan.memory.stages)
