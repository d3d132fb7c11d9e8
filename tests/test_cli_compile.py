"""telefuser-compile: --check over folders, --no-weights, --target, and the plan file it writes."""

from __future__ import annotations

import json

import pytest

from compiler_fixtures import model_set, write_recipe
from telefuser.cli.compile import main
from telefuser.schema.canonical import plan_hash


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_set(tmp_path_factory.mktemp("cli"))


def test_check_lists_each_recipe_and_fails_on_any(models, tmp_path, capsys):
    folder = tmp_path / "recipes"
    folder.mkdir()
    good = write_recipe(models).read_text().replace('path = "', f'path = "{models}/')
    (folder / "a_good.toml").write_text(good)
    (folder / "b_bad.toml").write_text(good.replace("num_inference_steps = 2", "num_inference_steps = 0"))
    assert main(["--check", str(folder)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok    ") and lines[0].split()[1].endswith("a_good.toml")
    assert lines[1].startswith("FAIL  ") and "b_bad.toml" in lines[1] and "num_inference_steps" in lines[1]
    assert lines[2] == "1 ok, 1 failed" and len(lines) == 3


def test_no_weights_check_accepts_auto_classes_and_still_checks_dispatch(tmp_path, capsys):
    recipe = write_recipe(tmp_path, dit_extra='class = "WanDiT"')  # the others stay "auto"; no weight files here
    text = recipe.read_text().replace("[target]\ndevice = \"cpu\"", "[target]\ndevice = \"cuda\"\ngpu = \"A100\"")
    recipe.write_text(text)
    assert main(["--check", "--no-weights", str(recipe)]) == 0
    assert main(["--check", str(recipe)]) == 1  # with weight inspection the absent files are named
    assert "does not exist" in capsys.readouterr().out
    assert main(["--check", "--no-weights", str(recipe), "--set", "layer2.models.dit.attention_config.attn_impl=FLASH_ATTN_3"]) == 1
    out = capsys.readouterr().out
    assert "FLASH_ATTN_3" in out and "compute capability >= 9.0" in out and "would work: TORCH_SDPA" in out


def test_no_weights_check_leaves_teacache_fits_to_the_weights(capsys):
    """Without the weights the DiT's size is unknown: TeaCache without coefficients passes --check --no-weights on
    the shipped Wan2.1 recipes (the compile with the weights picks the fit), and a Wan2.2 expert, which never has a
    published fit, is still refused there."""
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    teacache = ["--set", "layer2.models.dit.feature_cache_config.method=teacache"]
    for name in ("wan21_t2v_1.3b", "wan21_t2v_14b", "wan21_i2v_14b_480p"):
        assert main(["--check", "--no-weights", str(recipes / f"{name}.toml"), *teacache]) == 0, capsys.readouterr().out
    capsys.readouterr()
    expert = ["--set", "layer2.models.dit_high.feature_cache_config.method=teacache"]
    assert main(["--check", "--no-weights", str(recipes / "wan22_t2v_a14b.toml"), *expert]) == 1
    out = capsys.readouterr().out
    assert "a Wan2.2 expert" in out and "coefficients" in out and "dim None" not in out


def test_compile_with_no_weights_refused_before_any_work(models, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main([str(write_recipe(models)), "-o", str(out), "--no-weights"]) == 2
    err = capsys.readouterr().err
    assert "--no-weights is for --check only" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target,device,cc,gib", [("h200", "cuda", "9.0", 141.0), ("l40s", "cuda", "8.9", 48.0),
                                                  ("B200", "cuda", "10.0", 180.0), ("cpu", "cpu", None, None)])
def test_target_option(models, tmp_path, target, device, cc, gib):
    out = tmp_path / "plan.json"
    assert main([str(write_recipe(models)), "-o", str(out), "--target", target]) == 0
    plan = json.loads(out.read_text())
    assert (plan["device"], plan["target"]["compute_capability"]) == (device, cc)
    if gib is not None:
        assert plan["target"]["memory_bytes"] == int(gib * 2**30) == plan["memory"]["capacity_bytes"]
    assert {d["impl"] for d in plan["dispatch"] if d["op"] == "rms_norm"} == {"triton" if device == "cuda" else "torch"}


def test_plan_file_is_canonical_and_hash_checks(models, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    recipe = str(write_recipe(models))
    assert main([recipe, "-o", str(a)]) == 0 and main([recipe, "-o", str(b)]) == 0
    ta, tb = a.read_text(), b.read_text()
    plan = json.loads(ta)
    assert plan_hash(plan) == plan["plan_hash"]
    strip = lambda text: "\n".join(line for line in text.splitlines() if '"timestamp"' not in line)  # noqa: E731
    assert strip(ta) == strip(tb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temp files left
    for key in ("version", "timestamp", "pipeline_type", "device", "torch_dtype", "layer2_inference_config"):
        assert key in plan
    assert {"name", "path", "class"} <= set(plan["layer1_model_definition"]["models"][0])
    capsys.readouterr()
    assert main([recipe, "-o", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["plan_hash"] == plan["plan_hash"]


def test_explain_and_diff_of_a_mesh_change(models, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    recipe = str(write_recipe(models))
    assert main([recipe, "-o", str(a)]) == 0
    assert main([recipe, "-o", str(b), "--set", "target.num_devices=2", "--set", "layer2.parallel_config.sp_ulysses_degree=2"]) == 0
    capsys.readouterr()
    assert main(["--explain", str(b)]) == 0
    text = capsys.readouterr().out
    assert "mesh: 2 rank(s), sp_ulysses=2" in text and "dispatch:" in text and "memory: peak" in text
    assert main(["--diff", str(a), str(b)]) == 1
    changes = capsys.readouterr().out.splitlines()
    assert "~ mesh.degrees.sp_ulysses: 1 -> 2" in changes and "~ mesh.world_size: 1 -> 2" in changes
    assert not any("timestamp" in line or "plan_hash" in line for line in changes)
