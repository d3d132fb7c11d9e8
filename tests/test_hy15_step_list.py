"""A step-distilled HunyuanVideo-1.5 transformer sampled on its own timestep list (`layer2.denoising_step_list`, as
LightX2V's HunyuanVideo-1.5 step-distill scheduler and its 4-step configs: [1000, 750, 500, 250], shift 5, no CFG).

The sigmas against the published formula evaluated in float64 (sigma = s u / (1 + (s - 1) u), u = t / 1000; the
runtime computes in float32, as published: 1e-7 relative); the tiny plan run end to end on a list that is also the
solver's own 4-step grid (u = 1, 0.75, 0.5, 0.25, all exact in float32, and the same float32 operations) giving the
grid's video byte for byte; the DiT fed the listed timesteps' shifted values; the plan and `--explain` recording the
list; a solver other than Euler refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.errors import RecipeError
from telefuser.runtime.stages.hy15_denoise import hy15_sigmas
from telefuser.schema.canonical import pretty_json
from telefuser.schema.step_list import STEP_LIST_GRID

from hy15_fixtures import link_tiny_hy15

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny_hy15.toml"
LIST = [1000, 750, 500, 250]
DISTILLED = [f"layer2.denoising_step_list={json.dumps(LIST)}", "layer2.num_inference_steps=4", "layer2.cfg_scale=1.0"]


def test_sigmas_follow_the_published_formula() -> None:
    shift = 5.0
    expected = [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) for t in LIST] + [0.0]
    got = hy15_sigmas(4, shift, LIST)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-7, atol=0)
    assert [round(float(s) * 1000, 2) for s in got[:-1]] == [1000.0, 937.5, 833.33, 625.0]  # LightX2V's, 4 steps


def run(tmp_path: Path, overrides: list[str], name: str):
    plan = compile_recipe(TINY, overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return plan, telefuser.load_plan(str(path)).run(prompt='a "STOP" sign', seed=3, progress=False)


def test_the_list_of_the_grid_gives_the_grid_video(tmp_path: Path, monkeypatch) -> None:
    plan, listed = run(tmp_path, DISTILLED, "listed")
    denoise = next(s for s in plan.stages if s.kind == "hy15_denoise")
    assert denoise.params["grid"] == STEP_LIST_GRID and denoise.params["denoising_step_list"] == LIST
    _, grid = run(tmp_path, ["layer2.num_inference_steps=4", "layer2.cfg_scale=1.0"], "grid")
    assert listed.frames.shape == grid.frames.shape and np.array_equal(listed.frames, grid.frames)

    fed: list[float] = []  # the timesteps the DiT sees on a list that is not a linspace
    from telefuser.models.hunyuan15.dit import HunyuanVideo15DiT

    forward = HunyuanVideo15DiT.forward

    def spy(self, x, t, *args, **kwargs):
        fed.append(float(t.reshape(-1)[0]))
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(HunyuanVideo15DiT, "forward", spy)
    steps = [1000, 960, 889, 727]
    _, other = run(tmp_path, [f"layer2.denoising_step_list={json.dumps(steps)}", "layer2.num_inference_steps=4",
                              "layer2.cfg_scale=1.0"], "other")
    assert fed == pytest.approx([1000 * 5 * (t / 1000) / (1 + 4 * (t / 1000)) for t in steps], rel=1e-6)
    assert other.frames.shape == grid.frames.shape and not np.array_equal(other.frames, grid.frames)


def test_explain_shows_the_list_and_lcm_samples_it(tmp_path: Path) -> None:
    """LCM on the list (runtime/solvers' StepListLCMSolver, as for Wan: x0 re-noised to the next sigma from the run's
    generator) is the plan's solver; its video is not the flow step's."""
    from telefuser.compiler.explain import explain

    text = explain(compile_recipe(TINY, DISTILLED))
    assert "timesteps [1000, 750, 500, 250], shift 5.0" in text and "937.5" in text
    plan, lcm = run(tmp_path, ["layer2.sample_solver=lcm", *DISTILLED], "lcm")
    denoise = next(s for s in plan.stages if s.kind == "hy15_denoise").params
    assert (denoise["solver"], denoise["grid"]) == ("lcm", STEP_LIST_GRID)
    _, euler = run(tmp_path, DISTILLED, "euler")
    assert lcm.frames.shape == euler.frames.shape and not np.array_equal(lcm.frames, euler.frames)
    with pytest.raises(RecipeError, match="own timesteps"):
        compile_recipe(TINY, ["layer2.sample_solver=lcm"])


def test_a_meanflow_base_dit_is_fed_the_next_timestep(tmp_path: Path, monkeypatch) -> None:
    """The step-distilled 480p I2V transformer may carry MeanFlow's time_r_in (Tencent's pipeline then passes the next
    step's timestep, 0 at the last, as timestep_r): a tiny I2V DiT with time_r_in (the tiny SR DiT's, same width)
    compiles to a meanflow denoise stage and is called with t_r at every step."""
    from safetensors.torch import save_file

    from telefuser.models.hunyuan15 import tiny
    from telefuser.models.hunyuan15.dit import HunyuanVideo15DiT

    state = tiny.tiny_state_dict("dit_i2v")
    state.update({k: v for k, v in tiny.tiny_state_dict("dit_sr").items() if k.startswith("time_r_in.")})
    save_file(state, str(tmp_path / "dit_meanflow.safetensors"))
    link_tiny_hy15(tmp_path)  # the extended recipe's relative paths
    recipe = tmp_path / "meanflow.toml"
    recipe.write_text(f'extends = "{TINY.parent / "tiny_hy15_i2v.toml"}"\nname = "meanflow"\n\n[[layer1.models]]\n'
                      f'name = "dit"\nrole = "dit"\nclass = "HunyuanVideo15DiT"\npath = "{tmp_path / "dit_meanflow.safetensors"}"\n')
    plan = compile_recipe(recipe, [f"layer2.denoising_step_list={json.dumps(LIST)}", "layer2.num_inference_steps=4",
                                   "layer2.cfg_scale=1.0"])
    assert next(s for s in plan.stages if s.kind == "hy15_denoise").params["meanflow"] is True
    path = tmp_path / "plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    seen: list[tuple[float, float]] = []
    forward = HunyuanVideo15DiT.forward

    def spy(self, x, t, *args, t_r=None, **kwargs):
        seen.append((float(t.reshape(-1)[0]), float(t_r.reshape(-1)[0])))
        return forward(self, x, t, *args, t_r=t_r, **kwargs)

    monkeypatch.setattr(HunyuanVideo15DiT, "forward", spy)
    pixels = np.random.default_rng(4).integers(0, 256, (144, 256, 3), dtype=np.uint8)
    video = telefuser.load_plan(str(path)).run(prompt="a cat", seed=3, image=pixels, progress=False)
    fed = [t for t, _ in seen]
    assert [r for _, r in seen] == pytest.approx([*fed[1:], 0.0]) and len(seen) == 4
    assert video.frames.shape[0] == 5  # tiny_hy15's num_frames
