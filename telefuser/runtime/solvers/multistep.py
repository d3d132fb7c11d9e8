"""Exponential-integrator machinery shared by DPM++ 2M and UniPC (data prediction, flow sigmas).

With ``alpha = 1 - sigma`` the half log-SNR is ``lambda = log(alpha / sigma)``. Over a step
from ``sigma_s`` to ``sigma_t`` (``h = lambda_t - lambda_s``), solving the ODE exactly in
its linear part gives ``x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) x0_s``; the
multistep solvers add finite differences of the previous data predictions ``x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import FlowMatchSolver

MAX_ORDER = 2


def half_log_snr(sigma: float) -> float:
    """``log((1 - sigma) / sigma)``; +inf at sigma = 0, where the last step lands on x0."""
    if sigma == 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


@dataclass(frozen=True)
class ExponentialStep:
    """Scalar coefficients of one step from ``sigma_s`` to ``sigma_t`` (float64)."""

    sigma_s: float
    sigma_t: float

    @property
    def h(self) -> float:
        return half_log_snr(self.sigma_t) - half_log_snr(self.sigma_s)

    @property
    def sample_scale(self) -> float:
        return self.sigma_t / self.sigma_s

    @property
    def data_scale(self) -> float:
        """``-alpha_t * expm1(-h)``: weight of x0 in the first-order step (1 at sigma_t = 0)."""
        return -(1.0 - self.sigma_t) * math.expm1(-self.h)

    def first_order(self, sample: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        return self.sample_scale * sample + self.data_scale * data

    def lambda_ratio(self, sigma_before: float) -> float:
        """``r = (lambda_s - lambda_before) / h``: the previous step's size relative to this one."""
        return (half_log_snr(self.sigma_s) - half_log_snr(sigma_before)) / self.h


class MultistepFlowSolver(FlowMatchSolver):
    """Second-order multistep predictor on data predictions (DPM++ 2M, midpoint form).

    Keeps the last two data predictions; warms up with a first-order step and ends with one
    (the final sigma is 0, where only x0 matters).
    """

    def __init__(self, num_inference_steps: int, sigma_shift: float, num_train_timesteps: int = 1000) -> None:
        super().__init__(num_inference_steps, sigma_shift, num_train_timesteps)
        self._data_history: list[torch.Tensor] = []

    def _order(self, index: int) -> int:
        return min(MAX_ORDER, index + 1, self.num_inference_steps - index)

    def _update(self, index: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        data = sample - self._sigma[index] * velocity
        sample = self._refine(index, data, sample)
        self._data_history = [*self._data_history[1 - MAX_ORDER :], data]
        step = ExponentialStep(self._sigma[index], self._sigma[index + 1])
        prediction = step.first_order(sample, data)
        if self._order(index) == 2:
            # D1 = (x0_s - x0_before) / r; the midpoint rule weighs it by half the x0 weight.
            ratio = step.lambda_ratio(self._sigma[index - 1])
            prediction = prediction + (0.5 * step.data_scale / ratio) * (data - self._data_history[-2])
        return prediction

    def _refine(self, index: int, data: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Hook before the predictor, given this step's data prediction; DPM++ keeps the sample."""
        return sample
