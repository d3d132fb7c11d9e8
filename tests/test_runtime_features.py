"""Per-plan features on the tiny set: Wan2.2-style MoE switching, LoRA merge in both key layouts, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.errors import PlanError, RecipeError
from telefuser.runtime.plan_io import check_target
from telefuser.runtime.solvers import make_solver
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = (RECIPES / "tiny.toml").read_text()


def load(folder: Path, recipe_text: str):
    """Compile `recipe_text` beside a copy of the tiny weights and load the plan."""
    if not (folder / "tiny").exists():
        shutil.copytree(RECIPES / "tiny", folder / "tiny")
    (folder / "r.toml").write_text(recipe_text)
    plan = folder / "r.plan.json"
    plan.write_text(pretty_json(compile_recipe(folder / "r.toml").model_dump(mode="json", by_alias=True)))
    return telefuser.load_plan(str(plan))


MOE = TINY.replace('''name = "dit"
role = "dit"''', '''name = "dit_high"
role = "dit_high_noise"''').replace('''cfg_scale = 5.0''', '''cfg_scale = 5.0
boundary = 0.875
cfg_scale_high = 4.0
cfg_scale_low = 3.0''') + '''
[[layer1.models]]
name = "dit_low"
role = "dit_low_noise"
class = "WanDiT"
path = "tiny/dit.safetensors"
arch = { num_heads = 2 }
'''


def test_moe_runs_high_noise_dit_above_the_boundary_then_low(tmp_path):
    pipe = load(tmp_path, MOE)
    calls = {"dit_high": [], "dit_low": []}
    for name, seen in calls.items():
        pipe.placements[name].module.register_forward_hook(lambda m, args, out, seen=seen: seen.append(float(args[1])))
    pipe.run(prompt="a fox", seed=1, progress=False)
    timesteps = make_solver("unipc", 4, 5.0).timesteps.tolist()
    high = [t for t in timesteps if t >= 875]
    low = [t for t in timesteps if t < 875]
    assert high and low
    # CFG: each step calls its DiT twice (prompt, negative prompt).
    assert calls["dit_high"] == [t for t in high for _ in range(2)]
    assert calls["dit_low"] == [t for t in low for _ in range(2)]


def _lora_files(folder: Path) -> tuple[str, str]:
    """The same rank-2 update of block 0's self-attention query, in Wan/kohya and in diffusers/PEFT names."""
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0)}, str(folder / "wan_lora.safetensors"))
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": down,
               "transformer.blocks.0.attn1.to_q.lora_B.weight": up}, str(folder / "diffusers_lora.safetensors"))
    return "wan_lora.safetensors", "diffusers_lora.safetensors"


def _with_lora(path: str, strength: float) -> str:
    return TINY + f'''
[[layer2.models.dit.lora_configs]]
path = "{path}"
strength = {strength}
'''


def test_lora_merges_the_same_update_from_either_key_layout(tmp_path):
    wan, diffusers = _lora_files(tmp_path)
    base = load(tmp_path, TINY)
    q = base.placements["dit"].module.blocks[0].self_attn.q.weight.clone()
    plain = base.run(prompt="a fox", seed=2, progress=False).frames
    merged = load(tmp_path, _with_lora(wan, 0.5))
    # alpha 2 over rank 2 -> scale 1; strength 0.5
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    torch.testing.assert_close(merged.placements["dit"].module.blocks[0].self_attn.q.weight, q + 0.5 * up @ down,
                               atol=1e-5, rtol=1e-5)
    with_wan = merged.run(prompt="a fox", seed=2, progress=False).frames
    with_diffusers = load(tmp_path, _with_lora(diffusers, 0.5)).run(prompt="a fox", seed=2, progress=False).frames
    assert not np.array_equal(plain, with_wan)
    assert np.array_equal(with_wan, with_diffusers)


def test_multi_rank_plan_outside_a_launch_or_with_another_world_size_is_refused(tmp_path, monkeypatch):
    from telefuser.distributed.rank import check_world

    pipe = load(tmp_path, TINY)
    mesh = pipe.plan.mesh.model_copy(update={"world_size": 2, "degrees": {"cfg": 2}})
    plan = pipe.plan.model_copy(update={"mesh": mesh})
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(PlanError, match="torchrun --nproc-per-node 2"):
        check_world(plan)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(PlanError, match="started with 3 processes but the plan has 2 ranks"):
        check_world(plan)


def test_plan_assuming_packages_missing_here_is_refused(tmp_path):
    pipe = load(tmp_path, TINY)
    target = pipe.plan.target.model_copy(update={"packages": ["no_such_attention_package"]})
    with pytest.raises(PlanError, match="no_such_attention_package, which are not installed"):
        check_target(pipe.plan.model_copy(update={"target": target}))


def test_settings_the_runtime_cannot_honour_are_refused_at_compile_time_not_ignored(tmp_path):
    recipe = TINY + '''
[layer2.models.dit.feature_cache_config]
method = "teacache"
threshold = 0.1
'''
    # the tiny DiT has no published TeaCache polynomial: refused when compiled, never run without one
    with pytest.raises(RecipeError, match="rescaling polynomials are published for Wan2.1"):
        load(tmp_path, recipe)


def test_compile_wraps_each_dit_block_and_keeps_the_result(tmp_path):
    # backend "eager": dynamo traces the blocks (the graph capture is what the plan asks for)
    # without needing a C++ toolchain; the frames must not change.
    plain = load(tmp_path, TINY).run(prompt="a fox", seed=1, progress=False).frames
    pipe = load(tmp_path, TINY + '\n[layer2.models.dit.compile_config]\nenabled = true\nbackend = "eager"\n')
    assert all(block._compiled_call_impl is not None for block in pipe.placements["dit"].module.blocks)
    assert np.array_equal(pipe.run(prompt="a fox", seed=1, progress=False).frames, plain)


def test_cfg_scale_1_runs_one_dit_call_per_step_and_tiled_decode_follows_the_plan(tmp_path):
    # 26 > the VAE's default tile stride of 24 latent pixels (the plan records no stride), so tiles overlap.
    recipe = TINY.replace("cfg_scale = 5.0", "cfg_scale = 1.0\ntiled = true\ntile_size = [26, 26]")
    pipe = load(tmp_path, recipe)
    calls = []
    pipe.placements["dit"].module.register_forward_hook(lambda m, args, out: calls.append(args[2].shape[0]))
    vae = pipe.placements["vae"].module
    seen = {}
    decode = vae.decode

    def recording_decode(z, **kwargs):
        seen.update(kwargs)
        return decode(z, **kwargs)

    vae.decode = recording_decode
    video = pipe.run(prompt="a fox", seed=1, progress=False)
    assert calls == [1, 1, 1, 1]  # no negative branch: scale 1 makes it cancel out
    assert seen == {"tiled": True, "tile_size": (26, 26)}
    assert video.frames.shape == (9, 144, 256, 3)
