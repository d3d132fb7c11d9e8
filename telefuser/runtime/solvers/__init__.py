"""Flow-matching samplers: Euler, UniPC (Wan's default) and DPM++ 2M, with shifted sigmas.

Usage, one solver per generation::

    solver = make_solver("unipc", num_inference_steps=50, sigma_shift=5.0)
    for t in solver.timesteps:
        latents = solver.step(dit(latents, t.expand(batch)), t, latents)
"""

from __future__ import annotations

from .dpmpp import DPMSolverPlusPlus2M
from .euler import FlowMatchEulerSolver
from .schedule import FlowMatchSolver, shift_sigmas
from .unipc import UniPCSolver

_SOLVERS: dict[str, type[FlowMatchSolver]] = {
    "euler": FlowMatchEulerSolver,
    "unipc": UniPCSolver,
    "dpm++": DPMSolverPlusPlus2M,
}
SOLVER_NAMES: tuple[str, ...] = tuple(_SOLVERS)


def make_solver(
    name: str, num_inference_steps: int, sigma_shift: float, num_train_timesteps: int = 1000
) -> FlowMatchSolver:
    """A fresh solver; raises ValueError for an unknown name or an invalid schedule."""
    if name not in _SOLVERS:
        raise ValueError(f"unknown sample solver {name!r}; valid names: {', '.join(SOLVER_NAMES)}")
    return _SOLVERS[name](num_inference_steps, sigma_shift, num_train_timesteps)


__all__ = [
    "SOLVER_NAMES",
    "DPMSolverPlusPlus2M",
    "FlowMatchEulerSolver",
    "FlowMatchSolver",
    "UniPCSolver",
    "make_solver",
    "shift_sigmas",
]
