"""Weight inspection beyond plain safetensors: .pth pickles, shards, fp8, CLIP, and cross-model checks."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from compiler_fixtures import REPO, model_set, write_recipe
from telefuser.compiler import compile_recipe
from telefuser.compiler.detect import detect
from telefuser.compiler.pickle_index import read_pickle_index
from telefuser.compiler.weights import TensorInfo, WeightIndex
from telefuser.errors import WeightsError


def _models(plan) -> dict:
    return {m.name: m for m in plan.layer1_model_definition.models}


def _as_pth(folder, name: str) -> None:
    torch.save(load_file(folder / f"{name}.safetensors"), folder / f"{name}.pth")


def test_pth_checkpoints_read_from_their_pickle(tmp_path):
    folder = model_set(tmp_path)
    reference = _models(compile_recipe(write_recipe(folder)))
    for name in ("vae", "text_encoder"):
        _as_pth(folder, name)
    text = write_recipe(folder).read_text().replace("vae.safetensors", "vae.pth").replace(
        "text_encoder.safetensors", "text_encoder.pth")
    (folder / "pth.toml").write_text(text)
    models = _models(compile_recipe(folder / "pth.toml"))
    for name in ("vae", "text_encoder"):
        assert (models[name].class_, models[name].arch, models[name].parameter_count, models[name].dtype) == (
            reference[name].class_, reference[name].arch, reference[name].parameter_count, reference[name].dtype)
        fp = models[name].files[0]
        with zipfile.ZipFile(fp.path) as zf:
            pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
            assert fp.header_sha256 == hashlib.sha256(zf.read(pkl)).hexdigest()
        assert fp.size == os.path.getsize(fp.path)


def test_pickle_index_matches_torch_for_module_state_dicts(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)
    state = module.state_dict()  # carries `_metadata`, as Wan's checkpoints do
    state["fp8"] = torch.zeros(2, 5).to(torch.float8_e4m3fn)  # saved as an untyped storage + dtype
    state["param"] = torch.nn.Parameter(torch.ones(7))
    state["view"] = torch.zeros(10)[2:6].view(2, 2)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "m.pth")
    found = read_pickle_index(tmp_path / "m.pth")
    assert {k: (t.dtype, t.shape) for k, t in found.items()} == {
        k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()}


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_with_foreign_globals_refused_without_running_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": _RunsCode()}, protocol=2))
    folder = model_set(tmp_path / "set")
    (folder / "vae.pth").write_bytes((tmp_path / "evil.pth").read_bytes())
    (folder / "r.toml").write_text(write_recipe(folder).read_text().replace("vae.safetensors", "vae.pth"))
    with pytest.raises(WeightsError, match="refuses the global .*system"):
        compile_recipe(folder / "r.toml")
    assert not (tmp_path / "pwned").exists()
    (folder / "vae.pth").write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="not a zip archive"):
        compile_recipe(folder / "r.toml")


def test_sharded_dit_through_its_index(tmp_path):
    folder = model_set(tmp_path)
    state = load_file(folder / "dit.safetensors")
    names = sorted(state)
    halves = {"dit-00001-of-00002.safetensors": names[::2], "dit-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "dit.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    single = _models(compile_recipe(write_recipe(folder)))["dit"]
    text = write_recipe(folder).read_text().replace('path = "dit.safetensors"', 'path = "dit.safetensors.index.json"')
    (folder / "sharded.toml").write_text(text)
    sharded = _models(compile_recipe(folder / "sharded.toml"))["dit"]
    assert sharded.arch == single.arch and sharded.parameter_count == single.parameter_count
    assert [os.path.basename(f.path) for f in sharded.files] == sorted(halves)
    os.remove(folder / "dit-00002-of-00002.safetensors")
    with pytest.raises(WeightsError, match="missing.*00002"):
        compile_recipe(folder / "sharded.toml")


def test_fp8_detected_from_the_tensors(tmp_path):
    folder = model_set(tmp_path)
    state = load_file(folder / "dit.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}, folder / "dit.safetensors")
    dit = _models(compile_recipe(write_recipe(folder)))["dit"]
    assert dit.dtype == "float8_e4m3fn" and dit.attributes.fp8
    with pytest.raises(WeightsError, match="fp8 = false, but the weights are stored as float8_e4m3fn"):
        compile_recipe(write_recipe(folder, dit_extra="attributes = { fp8 = false }", name="f.toml"))


def _index(shapes: dict[str, tuple[int, ...]]) -> WeightIndex:
    return WeightIndex(files=[REPO / "x.pth"], tensors={k: TensorInfo("float16", s) for k, s in shapes.items()},
                       metadata={})


HF_CLIP = {"vision_model.embeddings.patch_embedding.weight": (64, 3, 14, 14),
           "vision_model.embeddings.position_embedding.weight": (5, 64),
           "vision_model.encoder.layers.0.self_attn.q_proj.weight": (64, 64),
           "vision_model.encoder.layers.0.mlp.fc1.weight": (256, 64),
           "vision_model.encoder.layers.1.self_attn.q_proj.weight": (64, 64)}


@pytest.mark.parametrize("shapes,layout", [
    ({"visual.patch_embedding.weight": (64, 3, 14, 14), "visual.pos_embedding": (1, 5, 64),
      "visual.transformer.0.attn.to_qkv.weight": (192, 64), "visual.transformer.0.mlp.0.weight": (256, 64),
      "visual.transformer.1.attn.to_qkv.weight": (192, 64), "textual.token_embedding.weight": (100, 32)}, "wan"),
    ({"visual.conv1.weight": (64, 3, 14, 14), "visual.positional_embedding": (5, 64),
      "visual.transformer.resblocks.0.attn.in_proj_weight": (192, 64),
      "visual.transformer.resblocks.0.mlp.c_fc.weight": (256, 64),
      "visual.transformer.resblocks.1.attn.in_proj_weight": (192, 64)}, "open_clip"),
    (HF_CLIP, "hf"),
    ({k.removeprefix("vision_model."): v for k, v in HF_CLIP.items()}, "hf"),  # transformers >= 5: no prefix
], ids=["wan", "open_clip", "hf", "hf_bare"])
def test_clip_detected_in_each_layout(shapes, layout):
    found = detect(_index(shapes))
    # 5 positions: the class token and 2 x 2 patches of 14 px -> 28 px images; heads = dim // 80 (at least 1).
    assert (found.class_name, found.layout, found.arch) == ("CLIPVision", layout, {
        "image_size": 28, "patch_size": 14, "dim": 64, "mlp_dim": 256, "num_heads": 1, "num_layers": 2, "eps": 1e-5,
        "activation": "gelu"})


def test_unknown_weights_named(tmp_path):
    with pytest.raises(WeightsError, match="match no model TeleFuser knows"):
        detect(_index({"encoder.layers.0.weight": (4, 4)}))


def test_t2v_weights_under_an_i2v_pipeline_refused(tmp_path):
    folder = model_set(tmp_path)
    text = write_recipe(folder).read_text().replace("[layer1]", '[layer1]\npipeline = "wan_i2v"')
    text += '\n[layer3.image]\nrequired = true\n'
    (folder / "i2v.toml").write_text(text)
    with pytest.raises(WeightsError, match="feeds DiT 'dit' 36 input channels, but its weights take 16 "
                                           r"\(a text-to-video model\)"):
        compile_recipe(folder / "i2v.toml")


def test_moe_experts_must_share_an_architecture(tmp_path):
    folder = model_set(tmp_path)
    state = load_file(folder / "dit.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.1.")}, folder / "low.safetensors")
    text = write_recipe(folder).read_text().replace('name = "dit"\nrole = "dit"', 'name = "high"\nrole = "dit_high_noise"')
    text = text.replace("[layer2]", '[[layer1.models]]\nname = "low"\nrole = "dit_low_noise"\npath = "low.safetensors"\n'
                                    'arch = { num_heads = 2 }\n[layer2]\nboundary = 0.875')
    (folder / "moe.toml").write_text(text)
    with pytest.raises(WeightsError, match="must share one architecture, but differ in num_layers"):
        compile_recipe(folder / "moe.toml")
    save_file(state, folder / "low.safetensors")
    plan = compile_recipe(folder / "moe.toml")
    denoise = next(s for s in plan.stages if s.name == "denoise")
    assert [p["model"] for p in denoise.params["phases"]] == ["high", "low"]
    assert denoise.params["boundary_timestep"] == 875.0
    assert all(m.attributes.moe for m in plan.layer1_model_definition.models if m.role.startswith("dit"))


def test_compile_imports_no_torch_even_for_pth(tmp_path):
    folder = model_set(tmp_path)
    _as_pth(folder, "vae")
    (folder / "r.toml").write_text(write_recipe(folder).read_text().replace("vae.safetensors", "vae.pth"))
    code = ("import sys; from telefuser.cli.compile import main; "
            f"rc = main([{str(folder / 'r.toml')!r}, '-o', {str(folder / 'plan.json')!r}]); "
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["0", "False"], out.stderr
