"""The compiler: weights read by their headers, decisions recorded, plans reproducible."""

from __future__ import annotations

import json

import pytest

from compiler_fixtures import model_set, write_recipe
from telefuser.compiler import compile_recipe
from telefuser.errors import PlanError, RecipeError, WeightsError
from telefuser.schema.canonical import plan_hash, pretty_json
from telefuser.schema.fingerprint import fingerprint


@pytest.fixture(scope="module")
def wan_set(tmp_path_factory):
    return model_set(tmp_path_factory.mktemp("wan"))


def plan_dict(recipe, *overrides, **kw) -> dict:
    return compile_recipe(recipe, overrides, **kw).model_dump(mode="json", by_alias=True)


def test_models_detected_from_headers(wan_set):
    plan = plan_dict(write_recipe(wan_set))
    models = {m["name"]: m for m in plan["layer1_model_definition"]["models"]}
    assert models["dit"]["class"] == "WanDiT" and models["dit"]["key_layout"] == "wan"
    assert models["dit"]["arch"] | {} == {"model_type": "t2v", "patch_size": [1, 2, 2], "in_dim": 16, "dim": 64,
                                        "ffn_dim": models["dit"]["arch"]["ffn_dim"], "freq_dim": models["dit"]["arch"]["freq_dim"],
                                        "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2,
                                        "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
    assert models["vae"]["class"] == "WanVAE" and models["vae"]["arch"]["z_dim"] == 16
    assert models["text_encoder"]["class"] == "UMT5Encoder" and models["text_encoder"]["arch"]["num_layers"] == 2
    assert models["tokenizer"]["class"] == "UMT5Tokenizer"
    for m in models.values():
        for f in m["files"]:
            assert f == fingerprint(f["path"]).model_dump()
    assert models["dit"]["parameter_count"] > 0 and models["dit"]["dtype"] == "float32"


def test_diffusers_and_hf_layouts_give_the_same_architecture(tmp_path, wan_set):
    wan = {m["name"]: m for m in plan_dict(write_recipe(wan_set))["layer1_model_definition"]["models"]}
    other = model_set(tmp_path / "diffusers", layout="diffusers")
    conv = {m["name"]: m for m in plan_dict(write_recipe(other))["layer1_model_definition"]["models"]}
    assert (conv["dit"]["key_layout"], conv["vae"]["key_layout"], conv["text_encoder"]["key_layout"]) == ("diffusers", "diffusers", "hf")
    for name in ("dit", "vae", "text_encoder"):
        assert conv[name]["arch"] == wan[name]["arch"]
        assert conv[name]["parameter_count"] == wan[name]["parameter_count"]


def test_plans_are_reproducible(wan_set, tmp_path):
    recipe = write_recipe(wan_set)
    a, b = plan_dict(recipe), plan_dict(recipe)
    assert a["plan_hash"] == b["plan_hash"] == plan_hash(a)
    a.pop("timestamp"), b.pop("timestamp")
    assert pretty_json(a) == pretty_json(b)
    # The hash is over the file's content as the runtime reads it back.
    text = pretty_json(plan_dict(recipe))
    assert plan_hash(json.loads(text)) == json.loads(text)["plan_hash"]
    # Formatting and comments do not change the recipe's identity; content does.
    reformatted = wan_set / "reformatted.toml"
    reformatted.write_text("# a comment\n" + recipe.read_text().replace("num_inference_steps = 2", "num_inference_steps=2"))
    assert plan_dict(reformatted)["recipe"]["source_sha256"] == a["recipe"]["source_sha256"]
    assert plan_dict(recipe, "layer2.num_inference_steps=3")["plan_hash"] != a["plan_hash"]


@pytest.mark.parametrize("dit_extra,error,needle", [
    ('class = "WanVAE"', WeightsError, "holds a WanDiT"),
    ("dtype = \"bfloat16\"", WeightsError, "stored as float32"),
    ("attributes = { fp8 = true }", WeightsError, "fp8"),
])
def test_recipe_contradicting_weights_is_refused(wan_set, dit_extra, error, needle):
    with pytest.raises(error, match=needle):
        compile_recipe(write_recipe(wan_set, dit_extra=dit_extra, name="bad.toml"))


def test_declared_arch_checked(wan_set):
    text = write_recipe(wan_set).read_text().replace("arch = { num_heads = 2 }", "arch = { num_heads = 2, dim = 128 }")
    (wan_set / "arch.toml").write_text(text)
    with pytest.raises(WeightsError, match="dim = 128 contradicts the weights, which have 64"):
        compile_recipe(wan_set / "arch.toml")


def test_weights_of_another_model_refused(wan_set):
    text = write_recipe(wan_set).read_text().replace('path = "vae.safetensors"', 'path = "text_encoder.safetensors"')
    (wan_set / "swap.toml").write_text(text)
    with pytest.raises(WeightsError, match="role 'vae' needs a WanVAE"):
        compile_recipe(wan_set / "swap.toml")


def _dispatch(plan: dict) -> dict[tuple[str, str], str]:
    return {(d["model"], d["op"]): d["impl"] for d in plan["dispatch"]}


def test_dispatch_cpu_and_cuda(wan_set):
    recipe = write_recipe(wan_set)
    cpu = _dispatch(plan_dict(recipe))
    assert cpu[("dit", "norm_modulate")] == "torch" and cpu[("dit", "attention")] == "TORCH_SDPA"
    h100 = plan_dict(recipe, "target.device=cuda", "target.gpu=H100")
    table = _dispatch(h100)
    assert table[("dit", "norm_modulate")] == "triton" and table[("dit", "rotary")] == "triton"
    assert h100["target"]["compute_capability"] == "9.0" and h100["device"] == "cuda"
    compiled = _dispatch(plan_dict(recipe, "target.device=cuda", "target.gpu=H100", "layer2.models.dit.compile_config.enabled=true"))
    assert compiled[("dit", "norm_modulate")] == "torch"
    assert all(d["reason"] for d in h100["dispatch"])


def test_impossible_attention_names_alternatives(wan_set):
    recipe = write_recipe(wan_set)
    bf16_hd64 = ["layer1.torch_dtype=bfloat16", "layer1.models.dit.arch.num_heads=1"]  # head dim 64
    with pytest.raises(RecipeError, match=r"FLASH_ATTN_3.*flash_attn_interface.*would work: TORCH_SDPA, TORCH_CUDNN, "
                                          r"SAGE_ATTN_2_8_8, SAGE_ATTN_2_8_16, SAGE_ATTN_2_8_8_SM90, RADIAL_ATTN, "
                                          r"LOCAL_SPARSE_ATTN\."):
        compile_recipe(recipe, ["target.device=cuda", "target.gpu=H100", *bf16_hd64,
                                "layer2.models.dit.attention_config.attn_impl=FLASH_ATTN_3"])
    with pytest.raises(RecipeError, match="not float32.*not 32"):  # fp32 and head dim 32: two reasons named
        compile_recipe(recipe, ["target.device=cuda", "target.gpu=H100", "target.packages=['flash_attn_interface']",
                                "layer2.models.dit.attention_config.attn_impl=FLASH_ATTN_3"])
    with pytest.raises(RecipeError, match="compute capability >= 9.0"):
        compile_recipe(recipe, ["target.device=cuda", "target.gpu=A100", "target.packages=['flash_attn_interface']",
                                "layer2.models.dit.attention_config.attn_impl=FLASH_ATTN_3"])
    ok = plan_dict(recipe, "target.device=cuda", "target.gpu=H100", "target.packages=['flash_attn_interface', 'triton']",
                   *bf16_hd64,
                   "layer2.models.dit.attention_config.attn_impl=FLASH_ATTN_3")
    assert _dispatch(ok)[("dit", "attention")] == "FLASH_ATTN_3"


def test_quantised_attention_requirements(wan_set):
    """SAGE_ATTN_*: Triton on a CUDA target, FP8 (8_8) from compute capability 8.9, the SM90 variant 9.0;
    on the CPU they run (the reference path), the plan saying so."""
    recipe = write_recipe(wan_set)
    sage = "layer2.models.dit.attention_config.attn_impl=SAGE_ATTN_2_8_8"
    bf16 = ["layer1.torch_dtype=bfloat16", "layer1.models.dit.arch.num_heads=1"]  # head dim 64
    with pytest.raises(RecipeError, match=r"compute capability >= 8.9"):
        compile_recipe(recipe, ["target.device=cuda", "target.gpu=A100", *bf16, sage])
    with pytest.raises(RecipeError, match=r"needs the package 'triton'"):
        compile_recipe(recipe, ["target.device=cuda", "target.gpu=H100", "target.packages=[]", *bf16, sage])
    with pytest.raises(RecipeError, match=r"compute capability >= 9.0"):
        compile_recipe(recipe, ["target.device=cuda", "target.gpu=RTX4090", *bf16, sage + "_SM90"])
    a100 = plan_dict(recipe, "target.device=cuda", "target.gpu=A100", *bf16,
                     "layer2.models.dit.attention_config.attn_impl=SAGE_ATTN_2_8_16")
    assert _dispatch(a100)[("dit", "attention")] == "SAGE_ATTN_2_8_16"
    cpu = plan_dict(recipe, sage)
    entry = next(d for d in cpu["dispatch"] if d["model"] == "dit" and d["op"] == "attention")
    assert entry["impl"] == "SAGE_ATTN_2_8_8" and "PyTorch reference" in entry["reason"]


def test_fp8_linear_needs_hopper_or_ada(wan_set):
    recipe = write_recipe(wan_set)
    with pytest.raises(RecipeError, match=">= 8.9"):
        compile_recipe(recipe, ["target.device=cuda", "target.gpu=A100", "layer2.models.dit.quant_config.quant_type=fp8_e4m3fn"])
    plan = plan_dict(recipe, "target.device=cuda", "target.gpu=H100", "layer2.models.dit.quant_config.quant_type=fp8_e4m3fn")
    assert _dispatch(plan)[("dit", "linear")] == "fp8_scaled_mm"


def test_mesh_cfg2_ulysses2(wan_set):
    plan = plan_dict(write_recipe(wan_set), "target.num_devices=4", "layer2.parallel_config.cfg_degree=2", "layer2.parallel_config.sp_ulysses_degree=2")
    mesh = plan["mesh"]
    assert mesh["world_size"] == 4 and mesh["degrees"]["cfg"] == 2 and mesh["degrees"]["sp_ulysses"] == 2
    assert [r["coords"]["cfg"] for r in mesh["ranks"]] == [0, 0, 1, 1]
    assert [r["coords"]["sp_ulysses"] for r in mesh["ranks"]] == [0, 1, 0, 1]
    assert mesh["groups"]["cfg"] == [[0, 2], [1, 3]] and mesh["groups"]["sp_ulysses"] == [[0, 1], [2, 3]]
    assert mesh["groups"]["tp"] == [[0], [1], [2], [3]]


def test_memory_over_capacity_refused(wan_set):
    with pytest.raises(PlanError, match="exceeds the target's.*MODEL_CPU_OFFLOAD"):
        compile_recipe(write_recipe(wan_set), ["target.memory_gib=0.5"])
    plan = plan_dict(write_recipe(wan_set))
    assert plan["memory"]["peak_bytes"] < plan["memory"]["capacity_bytes"]
    assert plan["memory"]["at"]["width"] == 256 and plan["memory"]["at"]["num_frames"] == 5


def test_stages_and_layer3(wan_set):
    plan = plan_dict(write_recipe(wan_set))
    assert [s["name"] for s in plan["stages"]] == ["load_models", "encode_text", "prepare_latents", "denoise",
                                                   "decode_vae", "write_video"]
    denoise = next(s for s in plan["stages"] if s["name"] == "denoise")
    assert denoise["params"]["solver"] == "unipc" and denoise["params"]["num_inference_steps"] == 2
    params = plan["layer3_user_interface"]["parameters"]
    assert params["resolution"]["choices"] == ["144p"] and params["seed"]["type"] == "integer"
    assert plan["layer3_user_interface"]["frame_sizes"]["144p"]["16:9"] == [256, 144]
    for key in ("version", "timestamp", "pipeline_type", "device", "torch_dtype", "layer2_inference_config"):
        assert key in plan  # the dump_config fields
