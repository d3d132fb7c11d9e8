"""First-order flow-matching Euler: ``x <- x + (sigma_next - sigma) * velocity``."""

from __future__ import annotations

import torch

from .schedule import FlowMatchSolver, linspace, shift_sigmas


class FlowMatchEulerSolver(FlowMatchSolver):
    """Parity target: diffusers ``FlowMatchEulerDiscreteScheduler(shift=sigma_shift)``."""

    def _shifted_sigmas(self) -> list[float]:
        steps = self.num_train_timesteps
        # diffusers shifts the ends of its float32 training grid, interpolates the timesteps
        # between them and shifts again; reproduced as is so the schedules agree.
        training_ends = torch.tensor([steps, 1.0], dtype=torch.float32) / steps
        sigma_max, sigma_min = shift_sigmas(training_ends, self.sigma_shift).tolist()
        timesteps = linspace(sigma_max * steps, sigma_min * steps, self.num_inference_steps)
        return [shift_sigmas(t / steps, self.sigma_shift) for t in timesteps]

    def _timesteps_for(self, shifted: list[float]) -> torch.Tensor:
        # Euler feeds the DiT the fractional float32 timestep sigma * T.
        return torch.tensor(shifted, dtype=torch.float32) * self.num_train_timesteps

    def _update(self, index: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        return sample + (sigma_next - sigma) * velocity
