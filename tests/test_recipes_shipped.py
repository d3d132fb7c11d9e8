"""Shipped recipes: all pass `--check --no-weights`, and the CLI's plan tools work on the tiny plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from telefuser.cli.compile import main
from telefuser.compiler import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(RECIPES.glob("*.toml"))


def test_check_all_recipes_without_weights(capsys):
    assert main(["--check", "--no-weights", str(RECIPES)]) == 0
    out = capsys.readouterr().out
    assert f"{len(SHIPPED)} ok, 0 failed" in out


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_recipe_starts_with_schema_directive(path):
    assert path.read_text(encoding="utf-8").startswith("#:schema ../telefuser/schema/recipe.schema.json")


def test_wan22_moe_recipe_values():
    recipe = load_recipe(RECIPES / "wan22_t2v_a14b.toml").recipe
    assert recipe.layer1.is_moe and recipe.layer2.boundary == 0.875
    # Wan2.2's sample_guide_scale = (3.0, 4.0) is (low noise, high noise).
    assert (recipe.layer2.cfg_scale_high, recipe.layer2.cfg_scale_low, recipe.layer2.sigma_shift) == (4.0, 3.0, 12.0)
    distill = load_recipe(RECIPES / "wan22_t2v_a14b_distill.toml").recipe
    assert distill.layer2.cfg_scale == 1.0 and distill.layer2.num_inference_steps == 4
    assert all(m.attributes.distill for m in distill.layer1.models if m.role.startswith("dit"))


def test_wan21_i2v_recipe_values():
    """Wan's generate.py for i2v-14B: 40 steps, guide scale 5.0, shift 3.0 at 832*480 / 480*832 and 5.0 otherwise;
    CLIP in float16 (wan_i2v_14B config's clip_dtype)."""
    for name, shift, resolution in (("wan21_i2v_14b_480p", 3.0, "480p"), ("wan21_i2v_14b_720p", 5.0, "720p")):
        recipe = load_recipe(RECIPES / f"{name}.toml").recipe
        l2 = recipe.layer2
        assert recipe.layer1.pipeline == "wan_i2v" and l2.enable_clip_stage, name
        assert (l2.num_inference_steps, l2.cfg_scale, l2.sigma_shift, l2.num_frames) == (40, 5.0, shift, 81), name
        assert [str(c) for c in recipe.layer3.resolution.choices] == [resolution] and recipe.layer3.image.required
        assert l2.models["image_encoder"].torch_dtype == "float16"
        release = "Wan2.1-I2V-14B-" + resolution.upper()
        assert all(release in m.path for m in recipe.layer1.models), name


def test_model_root_from_environment(monkeypatch):
    monkeypatch.setenv("TELEFUSER_MODEL_ROOT", "/data/wan")
    recipe = load_recipe(RECIPES / "wan21_t2v_1.3b.toml").recipe
    assert recipe.layer1.models[0].path == "/data/wan/Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors"


def test_multi_gpu_recipe_mesh():
    recipe = load_recipe(RECIPES / "wan21_t2v_14b_ulysses2_cfg2.toml").recipe
    assert recipe.target.num_devices == 4 and recipe.layer2.parallel_config.world_size == 4


def test_compile_explain_diff(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main([str(RECIPES / "tiny.toml"), "-o", str(a)]) == 0
    assert main([str(RECIPES / "tiny.toml"), "-o", str(b), "--set", "layer2.sample_solver=euler"]) == 0
    assert json.loads(a.read_text())["layer2_inference_config"]["sample_solver"] == "unipc"
    capsys.readouterr()
    assert main(["--explain", str(a)]) == 0
    explained = capsys.readouterr().out
    assert "WanDiT" in explained and "stages: load_models -> encode_text" in explained and "--resolution" in explained
    assert main(["--diff", str(a), str(b)]) == 1
    changes = capsys.readouterr().out
    assert "~ layer2_inference_config.sample_solver: \"unipc\" -> \"euler\"" in changes
    assert main(["--diff", str(a), str(a)]) == 0


def test_help_documents_everything(capsys):
    with pytest.raises(SystemExit):
        from telefuser.cli.compile import build_parser

        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--set", "--target", "--check", "--no-weights", "--explain", "--diff", "examples:"):
        assert option in text
