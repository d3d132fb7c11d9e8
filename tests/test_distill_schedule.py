"""Step-distilled schedules (layer2.denoising_step_list, telefuser/schema/step_list.py): the sigmas and timesteps
against the published formula computed here in float64, the two updates against hand computation, the recipe's
refusals, and the tiny plans run end to end with the DiT fed exactly the distilled timesteps (MoE: split between
the experts as LightX2V's boundary_step_index 2).

Tolerances: the schedule is computed in float32 as published (grid, shift, x1000), so a sigma is within a few
float32 roundings (1e-6) of the float64 value and a timestep within 1e-3; the updates run in float32 on float64
references: 1e-5 relative to the operands' scale."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import telefuser
from telefuser.cli.compile import main as compile_main
from telefuser.cli.run import main as run_main
from telefuser.compiler import compile_recipe, load_recipe
from telefuser.compiler.explain import explain
from telefuser.runtime.solvers import make_solver
from telefuser.schema.canonical import pretty_json
from telefuser.schema.step_list import step_list_timesteps

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PUBLISHED = [1000, 750, 500, 250]


def sigma64(t: int, shift: float) -> float:
    s = t / 1000
    return shift * s / (1 + (shift - 1) * s)


def test_the_published_4_step_schedule():
    solver = make_solver("euler", 4, 5.0, step_list=PUBLISHED)
    assert solver.sigmas.tolist() == pytest.approx([1.0, 0.9375, 5 / 6, 0.625, 0.0], abs=1e-6)
    assert solver.timesteps.tolist() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_random_lists_and_shifts_against_the_float64_formula(seed):
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, 1001), rng.randint(1, 12)), reverse=True)
    shift = rng.uniform(1.0, 12.0)
    solver = make_solver("lcm", len(steps), shift, step_list=steps, generator=torch.Generator().manual_seed(0))
    expected = [sigma64(t, shift) for t in steps]
    assert solver.sigmas[:-1].tolist() == pytest.approx(expected, abs=1e-6)
    assert solver.timesteps.tolist() == pytest.approx([1000 * s for s in expected], abs=1e-3)
    assert solver.sigmas[-1].item() == 0.0


def _operands(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 5, generator=g,
                                                                                  dtype=torch.float64)


def test_euler_is_the_flow_step_x0_plus_next_sigma_times_v():
    x, v = _operands(1)
    solver = make_solver("euler", 4, 5.0, step_list=PUBLISHED)
    sample = x.float()
    reference = x.clone()
    for i, t in enumerate(solver.timesteps):
        sigma, sigma_next = sigma64(PUBLISHED[i], 5.0), sigma64(PUBLISHED[i + 1], 5.0) if i < 3 else 0.0
        sample = solver.step(v.float(), t, sample)
        reference = (reference - sigma * v) + sigma_next * v  # LightX2V's step_post (Wan2.1 and Wan2.2), as published
        assert torch.allclose(sample.double(), reference, rtol=0, atol=1e-5 * 4)


def test_lcm_re_noises_from_the_generator_and_returns_x0_last():
    x, v = _operands(2)
    solver = make_solver("lcm", 4, 5.0, step_list=PUBLISHED, generator=torch.Generator().manual_seed(11))
    draws = torch.Generator().manual_seed(11)
    sample, reference = x.float(), x.clone()
    for i, t in enumerate(solver.timesteps):
        sample = solver.step(v.float(), t, sample)
        x0 = reference - sigma64(PUBLISHED[i], 5.0) * v
        if i < 3:
            sigma_next = sigma64(PUBLISHED[i + 1], 5.0)
            eps = torch.randn(x.shape, generator=draws, dtype=torch.float32).double()
            reference = (1 - sigma_next) * x0 + sigma_next * eps
        else:
            reference = x0
        assert torch.allclose(sample.double(), reference, rtol=0, atol=1e-5 * 4)


def test_a_step_list_needs_a_matching_solver_and_length():
    with pytest.raises(ValueError, match="step list is sampled with euler or lcm"):
        make_solver("unipc", 4, 5.0, step_list=PUBLISHED)
    with pytest.raises(ValueError, match="give step_list"):
        make_solver("lcm", 4, 5.0)
    with pytest.raises(ValueError, match="differs from the step list's 4"):
        make_solver("euler", 3, 5.0, step_list=PUBLISHED)


@pytest.mark.parametrize("layer2, needle", [
    ('denoising_step_list = [1000, 750, 750, 250]\nnum_inference_steps = 4', "strictly decreasing"),
    ('denoising_step_list = [1000, 500]\nnum_inference_steps = 4',
     "has 2 timesteps but num_inference_steps is 4; set num_inference_steps = 2"),
    ('denoising_step_list = [1001, 500]\nnum_inference_steps = 2', "within [1, 1000]"),
    ('denoising_step_list = [500, 0]\nnum_inference_steps = 2', "within [1, 1000]"),
    ('denoising_step_list = [1000, 500]\nnum_inference_steps = 2\nsample_solver = "unipc"',
     'sampled with sample_solver "euler" or "lcm", not \'unipc\''),
    ('sample_solver = "lcm"', "set layer2.denoising_step_list"),
])
def test_bad_step_lists_exit_2_naming_the_fix(tmp_path, capsys, layer2, needle):
    recipe = tmp_path / "bad.toml"
    shutil.copytree(RECIPES / "tiny", tmp_path / "tiny")
    shutil.copy(RECIPES / "tiny.toml", tmp_path / "tiny.toml")
    recipe.write_text(f'extends = "tiny.toml"\nname = "bad"\n[layer2]\n{layer2}\n')
    out = tmp_path / "plan.json"
    assert compile_main([str(recipe), "-o", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert needle in err and "Traceback" not in err
    assert not out.exists()


class FedTimesteps:
    """The timesteps each DiT forward receives (a forward pre-hook on the loaded model)."""

    def __init__(self, pipe, names: list[str]) -> None:
        self.seen: dict[str, list[float]] = {name: [] for name in names}
        for name in names:
            pipe.placements[name].module.register_forward_pre_hook(
                lambda _m, args, name=name: self.seen[name].append(round(float(args[1].reshape(-1)[0]), 3)))


def _tiny_plan(tmp_path, recipe: str, overrides=()) -> Path:
    if not (tmp_path / "tiny").exists():
        shutil.copytree(RECIPES / "tiny", tmp_path / "tiny")
    for name in ("tiny.toml", recipe):
        shutil.copy(RECIPES / name, tmp_path / name)
    plan = compile_recipe(tmp_path / recipe, overrides=overrides)
    path = tmp_path / f"plan{len(overrides)}.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return path


def test_the_tiny_distilled_plan_records_the_list_and_feeds_the_dit_exactly_those_timesteps(tmp_path, capsys):
    path = _tiny_plan(tmp_path, "tiny_distill.toml")
    plan = telefuser.load_plan(path).plan
    denoise = next(s for s in plan.stages if s.kind == "denoise")
    assert denoise.params["denoising_step_list"] == PUBLISHED and denoise.params["solver"] == "euler"
    assert denoise.params["sigma_shift"] == 5.0
    assert not denoise.params["cfg"]  # cfg 1: no negative branch
    assert "timesteps [1000, 750, 500, 250], shift 5.0 (the distilled model's list) -> DiT timesteps [1000.0, 937.5, " \
           "833.3, 625.0]" in explain(plan)
    assert compile_main(["--explain", str(path)]) == 0
    assert "timesteps [1000, 750, 500, 250], shift 5.0" in capsys.readouterr().out
    pipe = telefuser.load_plan(path)
    fed = FedTimesteps(pipe, ["dit"])
    first = pipe.run(prompt="a red fox", seed=3, progress=False).frames
    assert fed.seen["dit"] == [1000.0, 937.5, 833.333, 625.0]  # one forward per step: no CFG
    assert np.array_equal(pipe.run(prompt="a red fox", seed=3, progress=False).frames, first)  # the seed decides
    assert not np.array_equal(pipe.run(prompt="a red fox", seed=4, progress=False).frames, first)
    out = tmp_path / "fox.mp4"
    assert run_main([str(path), "--prompt", "a red fox", "-o", str(out)]) == 0
    assert out.stat().st_size > 0 and out.read_bytes()[4:8] == b"ftyp"


def test_the_re_noising_solver_runs_end_to_end_and_its_seed_decides(tmp_path):
    euler = telefuser.load_plan(_tiny_plan(tmp_path, "tiny_distill.toml"))
    path = _tiny_plan(tmp_path, "tiny_distill.toml", ["layer2.sample_solver=lcm"])
    pipe = telefuser.load_plan(path)
    assert next(s for s in pipe.plan.stages if s.kind == "denoise").params["solver"] == "lcm"
    fed = FedTimesteps(pipe, ["dit"])
    first = pipe.run(prompt="a red fox", seed=3, progress=False).frames
    assert fed.seen["dit"] == [1000.0, 937.5, 833.333, 625.0]
    assert np.array_equal(pipe.run(prompt="a red fox", seed=3, progress=False).frames, first)
    assert not np.array_equal(euler.run(prompt="a red fox", seed=3, progress=False).frames, first)  # it re-noised


def test_a_distilled_moe_gives_each_expert_two_steps_at_the_wan22_boundary(tmp_path):
    shutil.copytree(RECIPES / "tiny", tmp_path / "tiny")
    for name in ("tiny.toml", "tiny_wan22_i2v.toml"):
        shutil.copy(RECIPES / name, tmp_path / name)
    recipe = tmp_path / "distill.toml"
    recipe.write_text('extends = "tiny_wan22_i2v.toml"\nname = "moe_distill"\n[layer2]\nsample_solver = "euler"\n'
                      'num_inference_steps = 4\ndenoising_step_list = [1000, 750, 500, 250]\nsigma_shift = 5.0\n'
                      'boundary = 0.875\ncfg_scale = 1.0\ncfg_scale_high = 1.0\ncfg_scale_low = 1.0\n')
    plan = compile_recipe(recipe)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.model_dump(mode="json", by_alias=True)))
    text = explain(plan)
    assert "timesteps [1000, 750, 500, 250], shift 5.0" in text
    assert "experts per step (t >= 875: dit_high): ['dit_high', 'dit_high', 'dit_low', 'dit_low']" in text
    pipe = telefuser.load_plan(path)
    fed = FedTimesteps(pipe, ["dit_high", "dit_low"])
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    pipe.run(prompt="a cat", seed=1, image=image, progress=False)
    assert fed.seen == {"dit_high": [1000.0, 937.5], "dit_low": [833.333, 625.0]}


DISTILLED = ["wan21_t2v_14b_distill_4step.toml", "wan21_t2v_14b_lightx2v_lora_4step.toml",
             "wan21_t2v_14b_fp8_lightx2v_lora.toml", "wan22_t2v_a14b_distill.toml",
             "wan22_t2v_a14b_lightx2v_lora_4step.toml", "wan22_t2v_a14b_lightning_4step.toml"]


@pytest.mark.parametrize("name", DISTILLED)
def test_the_shipped_distilled_recipes_carry_the_published_schedule(name):
    """LightX2V's configs/distill/wan21|wan22 and Wan2.2-Lightning's wan_t2v_A14B config: [1000, 750, 500, 250] at
    shift 5, no CFG, the Euler flow step; a MoE runs the high-noise expert on the first 2 steps (LightX2V's
    boundary_step_index 2), here by Wan2.2's boundary 0.875 on the fed timesteps."""
    l2 = load_recipe(RECIPES / name).recipe.layer2
    assert (l2.denoising_step_list, l2.num_inference_steps, l2.sigma_shift, l2.cfg_scale) == (PUBLISHED, 4, 5.0, 1.0)
    assert l2.sample_solver == "euler"
    if l2.boundary is not None:
        assert (l2.cfg_scale_high, l2.cfg_scale_low) == (1.0, 1.0)
        fed = step_list_timesteps(l2.denoising_step_list, l2.sigma_shift)
        assert [t >= l2.boundary * 1000 for t in fed] == [True, True, False, False]


def test_wan22_lightning_euler_grid_is_the_published_list():
    """Wan2.2-Lightning's euler solver (wan/utils/fm_solvers_euler.py) shifts the float32 grid
    linspace(1000, 0, steps + 1) / 1000 at shift 5: for 4 steps that is the list [1000, 750, 500, 250] sampled here,
    to float32 rounding (1e-6), ending at sigma 0."""
    grid = np.linspace(1000, 0, 5, dtype=np.float32) / 1000
    lightning = (5.0 * grid / (1 + 4.0 * grid)).astype(np.float32)
    solver = make_solver("euler", 4, 5.0, step_list=PUBLISHED)
    assert solver.sigmas.tolist() == pytest.approx(lightning.tolist(), abs=1e-6)
