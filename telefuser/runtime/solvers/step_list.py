"""Solvers over a step-distilled model's own timestep list (the schedule's arithmetic: telefuser/schema/step_list.py).

Published facts, with their sources (facts and numbers only; the code here is this project's own):

- Timesteps and shift. ModelTC/LightX2V configs/distill/wan21/wan_t2v_distill_model_4step_cfg.json (Wan2.1 T2V 14B
  distilled weights, lightx2v/Wan2.1-Distill-Models/wan2.1_t2v_14b_lightx2v_4step.safetensors),
  configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json (the same sampled as base + the rank-64 LoRA),
  configs/distill/wan22/wan_moe_t2v_distill_lora_4step_cfg_ulysses.json (Wan2.2 A14B + one LoRA per expert) and the
  older configs/distill/wan_t2v_distill_4step_cfg.json (at 930c3209, gone from HEAD) all give "denoising_step_list":
  [1000, 750, 500, 250], "sample_shift": 5, "enable_cfg": false (one conditional forward per step; their
  "sample_guide_scale" is then unused).
- Step list -> sigma -> DiT timestep. ModelTC/LightX2V lightx2v/models/schedulers/wan/step_distill/scheduler.py
  (WanStepDistillScheduler.set_denoising_timesteps): the float32 training grid linspace(1, 0, 1001) without its
  last point, shifted by sample_shift (sigma' = shift * sigma / (1 + (shift - 1) * sigma)), indexed at 1000 - t for
  each listed t; the DiT is fed sigma' * 1000 (fractional). For the 4-step list at shift 5: sigmas 1.0, 0.9375,
  0.8333, 0.625 and timesteps 1000, 937.5, 833.33, 625.
- Update between steps. The same file's step_post: x0 = x - sigma * v; before the last step the next sample is
  x0 + sigma_next * v, i.e. the flow Euler step x + (sigma_next - sigma) * v; the last step returns x0 (the Euler
  step to sigma 0 is the same thing). At LightX2V's HEAD (f8aee98b) both WanStepDistillScheduler (Wan2.1) and
  Wan22StepDistillScheduler (Wan2.2 MoE) use it. From 2025-07-17 ("Use CM scheduler for distill_models as default",
  #127, 6af19588) to 2025-11-24 ("Dev hy15 distill", #506, 753a494c) the Wan2.1 scheduler instead re-noised x0 to
  the next sigma with fresh Gaussian noise from a seeded generator, (1 - sigma_next) * x0 + sigma_next * eps: this
  project keeps that as the "lcm" solver.
- Wan2.2 experts. LightX2V switches from the high-noise to the low-noise expert at "boundary_step_index": 2 (the
  first two of the four steps on the high-noise expert). ModelTC/Wan2.2-Lightning (the Seko 4-step LoRAs) samples
  with its "euler" solver (wan/utils/fm_solvers_euler.py: sigmas linspace(1000, 0, steps + 1) / 1000 shifted, the
  Euler flow step; generate.py warns to use euler "because it's used in distillation"), wan/configs/wan_t2v_A14B.py
  sample_steps 4, sample_shift 5.0, boundary 0.875, sample_guide_scale (1.0, 1.0); wan/text2video.py runs the
  high-noise expert while t >= boundary * 1000. That is the same list, [1000, 750, 500, 250], and 1000 and 937.5 are
  >= 875 while 833.3 and 625 are not: the same 2 + 2 split. (Its I2V config has boundary 0.900: the same split.)

Two updates, one class each:

- "euler": x + (sigma_next - sigma) * v (LightX2V's current Wan2.1 and Wan2.2 distill schedulers, Wan2.2-Lightning);
- "lcm": x0 = x - sigma * v, re-noised to the next sigma, x = (1 - sigma_next) * x0 + sigma_next * eps, x0 returned
  at the last step. The noise comes from the run's seeded generator, so a seed still gives one video.
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
