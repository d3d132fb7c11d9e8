"""TaylorSeer (Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers",
arXiv:2503.06923; Shenyi-Z/TaylorSeer; cache-dit runs it on the residual its DBCache reuses): instead of
adding the last computed residual unchanged, a reused step adds its Taylor forecast from the last computed
steps.

On each computed step s (d = s - the previous computed step) the factors are refreshed by finite
differences: F0 = residual, F(i+1) = (F(i) - F(i)_previous) / d, up to `order` (a factor is only formed
once its previous value exists: the first computed step gives F0 alone, the second F0 and F1, ...).
A reused step k steps after the last computed one adds sum_i F(i) k^i / i!. Which steps compute is a fixed
interval (TaylorSeer's "fresh" steps): a step computes when `interval` steps have passed since the last
computed one (and the forced computes of the engine: warm-up, final steps, no residual yet). No threshold.
"""

from __future__ import annotations

import math

import torch

from .base import CachePolicy, CallContext, StepCache


class TaylorSeerPolicy(CachePolicy):
    name = "taylorseer"
    first_blocks = 0

    def __init__(self, interval: int = 2, order: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1 (1: every step computes), got {interval}")
        if order not in (0, 1, 2):
            raise ValueError(f"order is 0 (plain reuse), 1 or 2, got {order}")
        self.interval = int(interval)
        self.order = int(order)

    def decide(self, cache: StepCache, ctx: CallContext, x: torch.Tensor, forced: bool) -> bool:
        last = ctx.state.policy.get("last_step")
        return forced or last is None or ctx.step - last >= self.interval

    def after_compute(self, cache: StepCache, ctx: CallContext) -> None:
        history = ctx.state.policy
        previous, last = history.get("factors", []), history.get("last_step")
        factors = [ctx.state.residual]
        if last is not None and ctx.step > last:
            distance = ctx.step - last
            for i in range(min(self.order, len(previous))):
                factors.append((factors[i] - previous[i]) / distance)
        history["factors"], history["last_step"] = factors, ctx.step

    def reuse_residual(self, cache: StepCache, ctx: CallContext) -> torch.Tensor:
        history = ctx.state.policy
        k = ctx.step - history["last_step"]
        out = history["factors"][0]
        for i, factor in enumerate(history["factors"][1:], start=1):
            out = out + factor * (k ** i / math.factorial(i))
        return out
