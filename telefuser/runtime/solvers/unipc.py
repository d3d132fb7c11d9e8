"""UniPC (B(h) = expm1(h), "bh2"), data prediction, order 2: Wan's default sampler.

The predictor is the DPM++ 2M step. At every step after the first, the fresh model output
at the new point corrects the previous step (UniC) before the next prediction, at no extra
model evaluation.
"""

from __future__ import annotations

import math

import torch

from .multistep import ExponentialStep, MultistepFlowSolver
from .schedule import linspace, shift_sigmas

# Keeps the first sigma below 1, where the log-SNR is finite.
_SIGMA_MAX_MARGIN = 1e-6


class UniPCSolver(MultistepFlowSolver):
    """Parity target: diffusers ``UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=sigma_shift)`` (predict_x0, bh2, solver_order 2,
    lower_order_final, corrector on every step)."""

    def __init__(self, num_inference_steps: int, sigma_shift: float, num_train_timesteps: int = 1000) -> None:
        super().__init__(num_inference_steps, sigma_shift, num_train_timesteps)
        self._predicted_from: torch.Tensor | None = None

    def _shifted_sigmas(self) -> list[float]:
        grid = linspace(1.0, 1.0 / self.num_train_timesteps, self.num_inference_steps + 1)[:-1]
        sigmas = [shift_sigmas(s, self.sigma_shift) for s in grid]
        if math.fabs(sigmas[0] - 1.0) < _SIGMA_MAX_MARGIN:
            sigmas[0] -= _SIGMA_MAX_MARGIN
        return sigmas

    def _refine(self, index: int, data: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self._predicted_from is not None:
            sample = self._correct(index, data)
        self._predicted_from = sample
        return sample

    def _correct(self, index: int, data: torch.Tensor) -> torch.Tensor:
        """Redo the step that led to ``sigmas[index]`` with the data prediction made there.

        The corrector has the order of the predictor it corrects and matches the finite
        differences (x0 history and the new x0) to B(h)-weighted phi functions.
        """
        step = ExponentialStep(self._sigma[index - 1], self._sigma[index])
        previous = self._data_history[-1]
        new_difference = data - previous
        corrected = step.first_order(self._predicted_from, previous)
        if self._order(index - 1) == 1:
            return corrected + (0.5 * step.data_scale) * new_difference
        ratio = step.lambda_ratio(self._sigma[index - 2])
        old_difference = (previous - self._data_history[-2]) / ratio
        rho_old, rho_new = _corrector_weights(step.h, ratio)
        return corrected + step.data_scale * (rho_old * old_difference + rho_new * new_difference)


def _corrector_weights(h: float, ratio: float) -> tuple[float, float]:
    """Solve ``[[1, 1], [-ratio, 1]] rho = [g1, 2 g2] / expm1(-h)`` for the UniC-2 weights.

    ``g1 = expm1(-h) / -h - 1`` and ``g2 = g1 / -h - 1/2`` are the phi-function terms of
    order 1 and 2; ``-ratio`` is the old point's log-SNR offset in units of h.
    """
    hh = -h
    b_h = math.expm1(hh)
    g1 = b_h / hh - 1.0
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / b_h, 2.0 * g2 / b_h
    rho_old = (b1 - b2) / (1.0 + ratio)
    return rho_old, b1 - rho_old
