"""Shifted flow-matching sigma schedule and the step bookkeeping every solver shares.

In rectified flow the noisy sample is ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and the
DiT predicts the velocity ``noise - x0``. ``sigma_shift`` spends more steps at high noise:
``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.

The grids are built with plain Python floats in the same operation order as the diffusers
schedulers (numpy float64), so the float32 sigmas and the timesteps come out bit-identical.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TypeVar

import torch

Number = TypeVar("Number", float, torch.Tensor)


def shift_sigmas(sigma: Number, shift: float) -> Number:
    """Time shift of flow matching; works on Python floats and on tensors alike."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def linspace(start: float, stop: float, num: int) -> list[float]:
    """``numpy.linspace`` in float64, reproduced operation for operation (start + i * step)."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num - 1)] + [stop]


class FlowMatchSolver(ABC):
    """A sampler for one generation: ``timesteps`` to feed the DiT, ``sigmas`` (one longer,
    ending at 0) and ``step``, called once per timestep in order.

    The update runs in float32 whatever the sample dtype; scalar coefficients are computed in
    float64 from the float32 sigmas.
    """

    def __init__(self, num_inference_steps: int, sigma_shift: float, num_train_timesteps: int = 1000) -> None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not (isinstance(sigma_shift, (int, float)) and math.isfinite(sigma_shift) and sigma_shift > 0):
            raise ValueError(f"sigma_shift must be a finite number > 0, got {sigma_shift!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        self.num_inference_steps = num_inference_steps
        self.sigma_shift = float(sigma_shift)
        self.num_train_timesteps = num_train_timesteps

        shifted = self._shifted_sigmas()
        self.sigmas: torch.Tensor = torch.tensor([*shifted, 0.0], dtype=torch.float32)
        self.timesteps: torch.Tensor = self._timesteps_for(shifted)
        # The float32-rounded sigmas as Python floats: the coefficient math needs no tensors.
        self._sigma: list[float] = self.sigmas.tolist()
        self._step_index = 0

    @abstractmethod
    def _shifted_sigmas(self) -> list[float]:
        """The ``num_inference_steps`` shifted sigmas in float64, highest first, without the final 0."""

    def _timesteps_for(self, shifted: list[float]) -> torch.Tensor:
        # diffusers' multistep schedulers give the DiT integer timesteps: trunc(sigma * T).
        return torch.tensor([math.trunc(s * self.num_train_timesteps) for s in shifted], dtype=torch.float32)

    @abstractmethod
    def _update(self, index: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The sample at ``sigmas[index + 1]`` from the float32 velocity and sample at ``sigmas[index]``."""

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` from ``timestep`` (the next entry of ``timesteps``) to the next sigma."""
        index = self._step_index
        if index >= self.num_inference_steps:
            raise RuntimeError(
                f"solver already took all {self.num_inference_steps} steps; make a fresh solver per generation"
            )
        expected = self.timesteps[index]
        if not bool(torch.all(torch.as_tensor(timestep, dtype=torch.float32).cpu() == expected)):
            raise ValueError(
                f"step {index} expects timestep {expected.item()} (solver.timesteps[{index}]), got {timestep!r}; "
                "call step once per entry of solver.timesteps, in order"
            )
        out = self._update(index, model_output.float(), sample.float())
        self._step_index += 1
        return out.to(sample.dtype)
