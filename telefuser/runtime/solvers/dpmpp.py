"""DPM-Solver++ 2M (multistep, second order, midpoint) for flow-matching models."""

from __future__ import annotations

from .multistep import MultistepFlowSolver
from .schedule import linspace, shift_sigmas


class DPMSolverPlusPlus2M(MultistepFlowSolver):
    """Parity target: diffusers ``DPMSolverMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=sigma_shift, algorithm_type="dpmsolver++", solver_order=2)``."""

    def _shifted_sigmas(self) -> list[float]:
        # N + 1 points sigma = 1 - alpha for alpha from 1/T to 1, highest first, so the schedule
        # starts at shift(1 - 1/T) < 1; the last point (sigma = 0) is the final sigma, added later.
        alphas = linspace(1.0, 1.0 / self.num_train_timesteps, self.num_inference_steps + 1)
        return [shift_sigmas(1.0 - a, self.sigma_shift) for a in reversed(alphas)][:-1]
