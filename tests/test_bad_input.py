"""Bad input: every case is a clear one-paragraph error, exit code 2, no traceback, no plan file left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from compiler_fixtures import model_set, write_recipe
from telefuser.cli.compile import main
from telefuser.compiler import load_recipe
from telefuser.errors import TeleFuserError


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return model_set(tmp_path_factory.mktemp("bad_input_models"))


def good(models: Path) -> str:
    return write_recipe(models).read_text()


def edit(old: str, new: str):
    return lambda text: text.replace(old, new, 1)


# (case id, how to make the recipe text from a good one, override list, words the message must contain)
TEXT_CASES = [
    ("empty", lambda t: "", [], ["is empty"]),
    ("whitespace_only", lambda t: "  \n\n", [], ["is empty"]),
    ("toml_syntax", edit('name = "t"', 'name = "t'), [], ["TOML syntax error", "line 1"]),
    ("truncated", lambda t: t[: t.index("[layer2]") + 4], [], ["TOML syntax error"]),
    ("duplicate_key", edit('name = "t"', 'name = "t"\nname = "u"'), [], ["TOML syntax error"]),
    ("unknown_top_key", edit('name = "t"', 'name = "t"\nnmae = "x"'), [], ["unknown key 'nmae'", "line 2"]),
    ("unknown_nested_key_hint", edit("num_inference_steps = 2", "num_inference_step = 2"), [],
     ["unknown key 'num_inference_step'", "did you mean 'num_inference_steps'"]),
    ("bad_enum_hint", edit("num_frames = 5", 'num_frames = 5\nsample_solver = "unipcc"'), [],
     ["must be one of", "Did you mean 'unipc'"]),
    ("bad_attention_impl", lambda t: t + '\n[layer2.models.dit.attention_config]\nattn_impl = "FLASH_ATTN"\n', [],
     ["layer2.models.dit.attention_config.attn_impl", "must be one of"]),
    ("wrong_type_string_for_int", edit("num_inference_steps = 2", 'num_inference_steps = "two"'), [],
     ["num_inference_steps", "integer", "'two'"]),
    ("wrong_type_bool", edit("num_frames = 5", "num_frames = true"), [], ["num_frames", "integer"]),
    ("zero_steps", edit("num_inference_steps = 2", "num_inference_steps = 0"), [], ["must be > 0", "found 0"]),
    ("negative_frames", edit("num_frames = 5", "num_frames = -3"), [], ["num_frames", "> 0"]),
    ("frames_not_4k1", edit("num_frames = 5", "num_frames = 6"), [], ["4k+1", "use 5 or 9"]),
    ("nan_cfg", edit("num_frames = 5", "num_frames = 5\ncfg_scale = nan"), [], ["cfg_scale", "finite"]),
    ("inf_shift", edit("num_frames = 5", "num_frames = 5\nsigma_shift = inf"), [], ["sigma_shift", "finite"]),
    ("negative_cfg", edit("num_frames = 5", "num_frames = 5\ncfg_scale = -1.0"), [], ["cfg_scale", ">= 0"]),
    # Names from before the reference design's vocabulary: refused, with the new name as the hint.
    ("old_name_impl", lambda t: t + '\n[layer2.models.dit.attention_config]\nimpl = "TORCH_SDPA"\n', [],
     ["unknown key 'impl'", "did you mean 'attn_impl'"]),
    ("old_name_offload_mode", lambda t: t + '\n[layer2.models.dit]\noffload_config = { mode = "MODEL_CPU_OFFLOAD" }\n', [],
     ["unknown key 'mode'", "did you mean 'offload_type'"]),
    ("old_name_parallel", lambda t: t + "\n[layer2.parallel]\nsp_ulysses = 2\n", [],
     ["unknown key 'parallel'", "did you mean 'parallel_config'"]),
    ("old_name_degree", lambda t: t + "\n[layer2.parallel_config]\nsp_ulysses = 2\n", [],
     ["unknown key 'sp_ulysses'", "did you mean 'sp_ulysses_degree'"]),
    ("old_name_set", lambda t: t, ["layer2.models.dit.attention.impl=TORCH_SDPA"], ["did you mean 'attention_config'"]),
    ("mesh_mismatch", lambda t: t + "\n[layer2.parallel_config]\nsp_ulysses_degree = 2\n", [], ["multiply to 2", "1 device"]),
    ("moe_fields_without_moe", edit("num_frames = 5", "num_frames = 5\nboundary = 0.9"), [], ["only to MoE"]),
    ("boundary_out_of_range", edit("num_frames = 5", "num_frames = 5\nboundary = 1.5"), [], ["boundary", "< 1"]),
    ("duplicate_model_names", edit('name = "vae"', 'name = "dit"'), [], ["unique", "dit"]),
    ("missing_vae_role", edit('role = "vae"', 'role = "image_encoder"'), [], ["role 'vae'"]),
    ("missing_layer1", lambda t: 'name = "t"\n', [], ["layer1"]),
    ("bad_name_chars", edit('name = "t"', 'name = "my recipe!"'), [], ["name", "pattern"]),
    ("resolution_default_not_in_choices", edit('default = "144p"', 'default = "720p"'), [], ["not one of the choices"]),
    ("unset_env_var", edit('path = "dit.safetensors"', 'path = "${TELEFUSER_SURELY_UNSET_VAR}/dit.safetensors"'), [],
     ["TELEFUSER_SURELY_UNSET_VAR", "is not set", "layer1.models.0.path"]),
    ("set_unknown_key", lambda t: t, ["layer2.num_inference_stepz=3"], ["not a recipe key", "num_inference_steps"]),
    ("set_bad_type", lambda t: t, ["layer2.num_inference_steps=many"], ["expected a integer", "'many'"]),
    ("set_no_equals", lambda t: t, ["layer2.num_inference_steps"], ["key.path=value"]),
    ("set_unknown_model", lambda t: t, ["layer1.models.dti.path=x"], ["no entry named 'dti'", "did you mean 'dit'"]),
    ("extends_missing", lambda t: 'extends = "nope.toml"\n' + t, [], ["nope.toml", "does not exist"]),
]


@pytest.mark.parametrize("case,make,overrides,needles", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_bad_recipe_text(models, tmp_path, case, make, overrides, needles):
    recipe = models / f"{case}.toml"
    recipe.write_text(make(good(models)), encoding="utf-8")
    with pytest.raises(TeleFuserError) as info:
        load_recipe(recipe, overrides)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message.strip()  # one paragraph


def _file_cases(models: Path, tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    binary = tmp / "binary.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    latin1 = tmp / "latin1.toml"
    latin1.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    a, b = tmp / "a.toml", tmp / "b.toml"
    a.write_text('extends = "b.toml"\n' + good(models))
    b.write_text('extends = "a.toml"\n' + good(models))
    fifo = tmp / "fifo.toml"
    os.mkfifo(fifo)
    return {
        "missing_file": (tmp / "nope.toml", ["no such recipe file"]),
        "directory": (tmp, ["is a directory"]),
        "binary": (binary, ["binary file"]),
        "non_utf8": (latin1, ["not UTF-8"]),
        "extends_cycle": (a, ["cycle", "a.toml -> b.toml -> a.toml"]),
        "fifo": (fifo, ["not a regular file"]),
    }


FILE_CASE_IDS = ["missing_file", "directory", "binary", "non_utf8", "extends_cycle", "fifo"]


@pytest.mark.parametrize("case", FILE_CASE_IDS)
def test_bad_recipe_file(models, tmp_path, case):
    path, needles = _file_cases(models, tmp_path)[case]
    with pytest.raises(TeleFuserError) as info:
        load_recipe(path)
    for needle in needles:
        assert needle in str(info.value)


WEIGHT_CASES = [
    ("missing_weights", edit('path = "dit.safetensors"', 'path = "absent.safetensors"'), ["absent.safetensors", "does not exist"]),
    ("truncated_weights", None, ["truncated"]),
    ("garbage_weights", None, ["not a readable safetensors file"]),
    ("other_architecture", edit('path = "vae.safetensors"', 'path = "dit.safetensors"'), ["needs a WanVAE", "WanDiT"]),
    ("unknown_tensors", None, ["match no model"]),
]


def _weights_case(models: Path, tmp: Path, case: str, make) -> Path:
    import shutil

    for f in models.iterdir():
        if f.is_file() and f.suffix in (".safetensors", ".json"):
            shutil.copy(f, tmp / f.name)
    text = good(models)
    if case == "truncated_weights":
        data = (tmp / "dit.safetensors").read_bytes()
        (tmp / "dit.safetensors").write_bytes(data[:100])
    elif case == "garbage_weights":
        (tmp / "dit.safetensors").write_bytes(b"\xff" * 64)
    elif case == "unknown_tensors":
        import torch
        from safetensors.torch import save_file

        save_file({"foo.weight": torch.zeros(2, 2)}, tmp / "dit.safetensors")
    else:
        text = make(text)
    recipe = tmp / "recipe.toml"
    recipe.write_text(text)
    return recipe


@pytest.mark.parametrize("case,make,needles", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights_cli(models, tmp_path, capsys, case, make, needles):
    recipe = _weights_case(models, tmp_path, case, make)
    out = tmp_path / "plan.json"
    assert main([str(recipe), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("telefuser-compile: error:")
    for needle in needles:
        assert needle in " ".join(err.split()), err
    assert not out.exists() and not list(tmp_path.glob(".plan.json.*"))


CLI_CASES = [case for case in TEXT_CASES if not case[2]][:12]


@pytest.mark.parametrize("case,make,overrides,needles", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_exit_code_2_and_no_plan(models, tmp_path, capsys, case, make, overrides, needles):
    recipe = models / f"cli_{case}.toml"
    recipe.write_text(make(good(models)), encoding="utf-8")
    out = tmp_path / "plan.json"
    assert main([str(recipe), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_output_folder_missing(models, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "plan.json"
    assert main([str(write_recipe(models)), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()


def test_cli_usage_errors(models, capsys):
    assert main([]) == 2
    assert main(["--explain", "/nonexistent/plan.json"]) == 2
    assert main([str(write_recipe(models)), "--target", "tpu", "-o", "x.json"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "use cpu, cuda, auto" in " ".join(err.split())
