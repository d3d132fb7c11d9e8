"""Solvers over a step-distilled model's own timestep list (telefuser/schema/step_list.py has the published facts).

Two updates, as the distilled models were trained to be sampled (ModelTC/LightX2V's step-distill schedulers):

- "euler" (Wan2.2 A14B distill): x0 = x - sigma * v, then x0 + sigma_next * v, i.e. the flow Euler step
  x + (sigma_next - sigma) * v;
- "lcm" (Wan2.1 step/CFG distill): x0 = x - sigma * v, then re-noised to the next sigma with fresh Gaussian noise,
  x = (1 - sigma_next) * x0 + sigma_next * eps; the last step returns x0. The noise comes from the run's seeded
  generator, so a seed still gives one video.
"""

from __future__ import annotations

from typing import Optional

import torch

from telefuser.schema.step_list import step_list_sigmas

from .schedule import FlowMatchSolver


class StepListSolver(FlowMatchSolver):
    """The sigmas of `step_list` (shifted on the training grid); subclasses give the update."""

    def __init__(self, step_list: list[int], sigma_shift: float, num_train_timesteps: int = 1000) -> None:
        self.step_list = list(step_list)
        super().__init__(len(self.step_list), sigma_shift, num_train_timesteps)

    def _shifted_sigmas(self) -> list[float]:
        return step_list_sigmas(self.step_list, self.sigma_shift, self.num_train_timesteps)

    def _timesteps_for(self, shifted: list[float]) -> torch.Tensor:
        return torch.tensor(shifted, dtype=torch.float32) * self.num_train_timesteps  # fractional, as published


class StepListEulerSolver(StepListSolver):
    def _update(self, index: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return sample + (self.sigmas[index + 1] - self.sigmas[index]) * velocity


class StepListLCMSolver(StepListSolver):
    def __init__(self, step_list: list[int], sigma_shift: float, num_train_timesteps: int = 1000,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(step_list, sigma_shift, num_train_timesteps)
        self.generator = generator

    def _update(self, index: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        x0 = sample - self._sigma[index] * velocity
        if index == self.num_inference_steps - 1:
            return x0
        if self.generator is None:
            raise RuntimeError("the lcm solver re-noises between steps: give it the run's seeded generator")
        # drawn on the generator's device (the CPU, as the initial noise) so every rank and device gets the same
        eps = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32,
                          device=self.generator.device).to(x0.device)
        sigma_next = self._sigma[index + 1]
        return (1 - sigma_next) * x0 + sigma_next * eps
