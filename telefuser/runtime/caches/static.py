"""Static step cache: the plan names the steps that compute; every other step reuses the residual of the
whole block stack from the last computed step (cache-dit's `steps_computation_mask`, LightX2V's custom
cache). No threshold: the same steps are reused whatever the activations, so the result is reproducible
and its cost known when the plan is compiled. A step that would reuse before any step has computed computes
(there is nothing to reuse)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .base import CachePolicy, CallContext, StepCache


def compute_steps_from_mask(mask: Sequence[bool | int]) -> list[int]:
    """The computed step indices of a per-step mask (1/True: compute, 0/False: reuse)."""
    return [i for i, flag in enumerate(mask) if flag]


class StaticPolicy(CachePolicy):
    name = "static"
    first_blocks = 0

    def __init__(self, compute_steps: Iterable[int]) -> None:
        steps = sorted({int(s) for s in compute_steps})
        if any(s < 0 for s in steps):
            raise ValueError(f"step indices are 0-based, got {steps}")
        self.compute_steps = frozenset(steps)

    def decide(self, cache: StepCache, ctx: CallContext, x: torch.Tensor, forced: bool) -> bool:
        return forced or ctx.step in self.compute_steps
