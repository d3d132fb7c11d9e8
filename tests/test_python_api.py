"""The Python API beside the CLI: dump_config, telefuser.compile(hash_weights=...), load_plan(verify_weights=...)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import telefuser
from telefuser.errors import WeightsError
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _tiny_copy(folder: Path) -> Path:
    shutil.copytree(RECIPES / "tiny", folder / "tiny")
    shutil.copy(RECIPES / "tiny.toml", folder / "tiny.toml")
    return folder / "tiny.toml"


def test_dump_config_returns_the_plan_and_its_file_runs_identically(tmp_path):
    plan = telefuser.compile(RECIPES / "tiny.toml")
    path = tmp_path / "plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    pipe = telefuser.load_plan(str(path))
    config = pipe.dump_config()
    assert set(config) >= {"layer1_model_definition", "layer2_inference_config", "layer3_user_interface", "mesh",
                           "stages"} and config["plan_hash"] == plan.plan_hash
    dumped = tmp_path / "dumped.json"
    assert pipe.dump_config(dumped) == config and json.loads(dumped.read_text()) == config
    assert not list(tmp_path.glob(".dumped.json.*"))  # written through a temporary file and a rename
    again = telefuser.load_plan(str(dumped))
    a = pipe.run(prompt="a fox", seed=4, progress=False).frames
    b = again.run(prompt="a fox", seed=4, progress=False).frames
    assert np.array_equal(a, b)


def test_compile_with_hash_weights_and_load_plan_verifies_them(tmp_path):
    recipe = _tiny_copy(tmp_path)
    plan = telefuser.compile(recipe, hash_weights=True)
    assert all(f.sha256 and len(f.sha256) == 64 for m in plan.layer1_model_definition.models for f in m.files)
    assert telefuser.compile(recipe).layer1_model_definition.models[0].files[0].sha256 is None
    path = tmp_path / "plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    telefuser.load_plan(str(path))  # unchanged files verify
    weights = tmp_path / "tiny" / "dit.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the tensor bytes: size and header unchanged
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="dit.safetensors"):
        telefuser.load_plan(str(path))
    telefuser.load_plan(str(path), verify_weights=False)  # the caller's choice
