"""First-block cache: cache-dit's DBCache with Fn = `first_blocks` (default 1) computed blocks and Bn = 0.

The first `first_blocks` blocks run on every step. Their output residual r = out(block Fn-1) - in(block 0)
is compared with the same residual of the last fully computed step of this branch:
rel = mean|r - r_last| / mean|r_last|. Under `threshold` the remaining blocks are skipped and their cached
residual is added to block Fn-1's output; otherwise they run, and r becomes r_last (it is updated only on
fully computed steps, so a slow drift accumulates against the last real computation, as cache-dit does).
"""

from __future__ import annotations

import torch

from .base import CachePolicy, CallContext, StepCache, relative_l1


class FirstBlockPolicy(CachePolicy):
    name = "first_block"

    def __init__(self, threshold: float, first_blocks: int = 1) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if first_blocks < 1:
            raise ValueError(f"the first-block cache computes at least one block (Fn >= 1), got {first_blocks}")
        self.threshold = float(threshold)
        self.first_blocks = int(first_blocks)

    def decide(self, cache: StepCache, ctx: CallContext, x: torch.Tensor, forced: bool) -> bool:
        residual = x - ctx.first_input  # block Fn's input is block Fn-1's output
        history = ctx.state.policy
        last = history.get("first_residual")
        compute = (forced or last is None or last.shape != residual.shape or self.threshold <= 0
                   or relative_l1(residual, last, cache.reduce_sums) >= self.threshold)
        if compute:  # kept only until the stack has run (then it becomes the reference), never on reuse
            history["pending"] = residual
        return compute

    def after_compute(self, cache: StepCache, ctx: CallContext) -> None:
        history = ctx.state.policy
        history["first_residual"] = history.pop("pending", None)
