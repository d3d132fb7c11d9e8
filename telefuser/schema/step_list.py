"""The sigma schedule of a step-distilled model: its own fixed list of training timesteps, not a solver's grid.

Published facts (ModelTC/LightX2V, lightx2v/models/schedulers/wan/step_distill/scheduler.py and its configs under
configs/distill/wan21/ and configs/distill/wan22/; ModelTC/Wan2.2-Lightning, wan/configs/wan_t2v_A14B.py and
wan/utils/fm_solvers_euler.py; telefuser/runtime/solvers/step_list.py cites them in full, with the update rules):

- The training grid is sigma_i = 1 - i / 1000 for i = 0..999 (float32 `linspace(1, 0, 1001)` without its last
  point), shifted by the model's `sample_shift`: sigma' = shift * sigma / (1 + (shift - 1) * sigma).
- An entry t of `denoising_step_list` selects grid index 1000 - t; the DiT is fed sigma' * 1000 (fractional).
- The 4-step models use denoising_step_list = [1000, 750, 500, 250] with sample_shift 5.0 and no CFG: sigmas
  1.0, 0.9375, 0.8333, 0.625, timesteps 1000, 937.5, 833.3, 625.
- Wan2.2 A14B's pair switches expert after 2 of the 4 steps (LightX2V's `boundary_step_index` 2); Wan2.2's own
  boundary, t >= 0.875 * 1000 for the high-noise expert (Wan2.2-Lightning's T2V config), splits these timesteps
  the same way.

Shared by the compiler (which records and explains the schedule) and the runtime's solvers.
"""

from __future__ import annotations

from typing import Optional

NUM_TRAIN_TIMESTEPS = 1000


def check_step_list(steps: list[int], num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
    """Raise ValueError unless `steps` is a non-empty, strictly decreasing list of integers in [1, T]."""
    if not steps:
        raise ValueError("denoising_step_list is empty; give the distilled model's timesteps, e.g. [1000, 750, 500, 250]")
    if any(isinstance(t, bool) or not isinstance(t, int) for t in steps):
        raise ValueError(f"denoising_step_list must hold integers, got {steps}")
    if any(not 1 <= t <= num_train_timesteps for t in steps):
        raise ValueError(f"denoising_step_list entries must be within [1, {num_train_timesteps}] (grid index T - t), "
                         f"got {steps}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"denoising_step_list must be strictly decreasing (highest noise first), got {steps}")


def step_list_sigmas(steps: list[int], shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """The shifted sigma of each listed timestep, computed in float32 on the training grid as published."""
    import torch  # the published float32 arithmetic; imported here so the schema package stays torch-free

    check_step_list(steps, num_train_timesteps)
    grid = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
    shifted = shift * grid / (1 + (shift - 1) * grid)
    return shifted[[num_train_timesteps - t for t in steps]].tolist()


def step_list_timesteps(steps: list[int], shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """What the DiT is fed at each step: sigma * T in float32."""
    import torch

    sigmas = torch.tensor(step_list_sigmas(steps, shift, num_train_timesteps), dtype=torch.float32)
    return (sigmas * num_train_timesteps).tolist()


# How a plan's flow-matching Euler stage names its sigma grid (HunyuanVideo-1.5's hy15_denoise / hy15_sr).
SHIFTED_LINSPACE_GRID = "linspace_1_0_shifted"  # linspace(1, 0, N + 1)[:-1] shifted: the solver's own grid
STEP_LIST_GRID = "step_list_shifted"  # a step-distilled model's `denoising_step_list` on the training grid, shifted
SOLVER_GRID = "solver_shifted"  # unipc / dpm++: the solver's own shifted grid and timesteps (runtime/solvers, Wan's)


def grid_params(step_list: Optional[list[int]], solver: str = "euler") -> dict:
    """The stage params naming the grid: Euler's shifted linspace, a multistep solver's own grid, or the listed
    timesteps (recorded in the plan)."""
    if step_list is None:
        return {"grid": SHIFTED_LINSPACE_GRID if solver == "euler" else SOLVER_GRID}
    return {"grid": STEP_LIST_GRID, "denoising_step_list": list(step_list)}
