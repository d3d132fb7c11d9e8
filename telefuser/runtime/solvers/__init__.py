"""Flow-matching samplers: Euler, UniPC (Wan's default) and DPM++ 2M, with shifted sigmas; over a step-distilled
model's own timestep list, Euler and LCM (step_list.py).

Usage, one solver per generation::

    solver = make_solver("unipc", num_inference_steps=50, sigma_shift=5.0)
    for t in solver.timesteps:
        latents = solver.step(dit(latents, t.expand(batch)), t, latents)
"""

from __future__ import annotations

from typing import Optional

import torch

from .dpmpp import DPMSolverPlusPlus2M
from .euler import FlowMatchEulerSolver
from .schedule import FlowMatchSolver, shift_sigmas
from .step_list import StepListEulerSolver, StepListLCMSolver
from .unipc import UniPCSolver

_SOLVERS: dict[str, type[FlowMatchSolver]] = {
    "euler": FlowMatchEulerSolver,
    "unipc": UniPCSolver,
    "dpm++": DPMSolverPlusPlus2M,
}
SOLVER_NAMES: tuple[str, ...] = tuple(_SOLVERS)  # the solvers of an evenly spaced, shifted grid
STEP_LIST_SOLVERS = ("euler", "lcm")  # the updates a step-distilled model's list is sampled with


def make_solver(
    name: str, num_inference_steps: int, sigma_shift: float, num_train_timesteps: int = 1000,
    step_list: Optional[list[int]] = None, generator: Optional[torch.Generator] = None,
) -> FlowMatchSolver:
    """A fresh solver; raises ValueError for an unknown name or an invalid schedule. With `step_list` (a distilled
    model's timesteps) the solver samples those, and `num_inference_steps` must be its length; "lcm" re-noises
    between steps from `generator`."""
    if name not in (*SOLVER_NAMES, *STEP_LIST_SOLVERS):
        raise ValueError(f"unknown sample solver {name!r}; valid names: {', '.join(SOLVER_NAMES)}, lcm")
    if step_list is None:
        if name == "lcm":
            raise ValueError("the lcm solver samples a distilled model's own timesteps: give step_list")
        return _SOLVERS[name](num_inference_steps, sigma_shift, num_train_timesteps)
    if name not in STEP_LIST_SOLVERS:
        raise ValueError(f"a step list is sampled with {' or '.join(STEP_LIST_SOLVERS)}, not {name!r}")
    if len(step_list) != num_inference_steps:
        raise ValueError(f"num_inference_steps {num_inference_steps} differs from the step list's {len(step_list)}")
    if name == "lcm":
        return StepListLCMSolver(step_list, sigma_shift, num_train_timesteps, generator)
    return StepListEulerSolver(step_list, sigma_shift, num_train_timesteps)


__all__ = [
    "SOLVER_NAMES",
    "STEP_LIST_SOLVERS",
    "DPMSolverPlusPlus2M",
    "FlowMatchEulerSolver",
    "FlowMatchSolver",
    "StepListEulerSolver",
    "StepListLCMSolver",
    "UniPCSolver",
    "make_solver",
    "shift_sigmas",
]
