"""Step caches around an unchanged DiT: `teacache`, `first_block` (DBCache Fn=1, Bn=0), `static` and
`taylorseer` (a fixed interval, reused steps forecast by a Taylor expansion).

`apply_step_cache(dit, method, ...)` attaches one and returns the `StepCache` (its `stats()`, `reset()`,
`begin_step(i)`, `detach()`); see `base` for the mechanism and each module for its rule and sources.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from .base import BranchState, CachePolicy, CallContext, StepCache, relative_l1
from .first_block import FirstBlockPolicy
from .static import StaticPolicy, compute_steps_from_mask
from .taylorseer import TaylorSeerPolicy
from .teacache import (COEFFICIENTS, HY15_COEFFICIENTS, RET_WARMUP_STEPS, WAN21_COEFFICIENTS, TeaCachePolicy, polyval,
                       wan21_coefficients_key)

METHODS = ("teacache", "first_block", "static", "taylorseer")


def apply_step_cache(dit: torch.nn.Module, method: str, threshold: float = 0.0, *,
                     coefficients: Sequence[float] | str | None = None, teacache_input: str = "t_emb",
                     first_blocks: int = 1, compute_steps: Optional[Iterable[int]] = None,
                     interval: int = 2, order: int = 1,
                     warmup_steps: int = 0, max_consecutive_skips: Optional[int] = None,
                     num_inference_steps: Optional[int] = None, final_steps: int = 0,
                     branch_names: Sequence[str] = ("cond", "uncond"),
                     reduce_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> StepCache:
    """Attach a step cache to `dit` (a WanDiT, a HunyuanVideo15DiT, or any module with `residual_stack()`
    called as `dit(x, t, ...)`; for TeaCache also `time_embeddings(t)` (inputs "t_emb", "e0") or
    `teacache_input(block_args)` (input "modulated")).

    - "teacache": `threshold` on the accumulated rescaled change; `coefficients` a key of `COEFFICIENTS`
      (Wan2.1's and HunyuanVideo-1.5's fits) or the polynomial itself (default: `wan21_coefficients_key` from a
      Wan DiT's config; a "_ret" key implies `teacache_input="e0"`, a "hunyuan_video15_" key "modulated");
    - "first_block": `threshold` on the relative L1 change of the first `first_blocks` blocks' residual;
    - "static": `compute_steps`, the step indices that compute (threshold unused);
    - "taylorseer": a step computes every `interval` steps, the others add the `order` (0, 1, 2) Taylor
      forecast of the stack residual (threshold unused).
    Common: `warmup_steps`, `max_consecutive_skips`, `num_inference_steps` + `final_steps`, `branch_names`
    (the branches in call order within a step; one name under cfg parallel), `reduce_sums` (sequence
    parallel: sums a [2] tensor across the ranks holding shards)."""
    if method == "teacache":
        if coefficients is None:
            cfg = dit.config
            if not hasattr(cfg, "dim"):
                raise ValueError(f"TeaCache on a {type(dit).__name__}: give the coefficients (a key of COEFFICIENTS "
                                 "or the polynomial)")
            coefficients = wan21_coefficients_key(cfg.dim, cfg.model_type, ret_steps=teacache_input == "e0")
        if isinstance(coefficients, str) and coefficients.endswith("_ret"):
            teacache_input = "e0"
        if isinstance(coefficients, str) and coefficients in HY15_COEFFICIENTS:
            teacache_input = "modulated"
        policy: CachePolicy = TeaCachePolicy(threshold, coefficients, teacache_input)
    elif method == "first_block":
        policy = FirstBlockPolicy(threshold, first_blocks)
    elif method == "static":
        if compute_steps is None:
            raise ValueError("the static cache needs compute_steps (the step indices that compute)")
        policy = StaticPolicy(compute_steps)
    elif method == "taylorseer":
        policy = TaylorSeerPolicy(interval, order)
    else:
        raise ValueError(f"unknown step cache method {method!r}; one of {', '.join(METHODS)}")
    return StepCache(dit, policy, warmup_steps=warmup_steps, max_consecutive_skips=max_consecutive_skips,
                     num_inference_steps=num_inference_steps, final_steps=final_steps, branch_names=branch_names,
                     reduce_sums=reduce_sums).attach()


__all__ = ["METHODS", "apply_step_cache", "StepCache", "CachePolicy", "BranchState", "CallContext", "relative_l1",
           "TeaCachePolicy", "FirstBlockPolicy", "StaticPolicy", "TaylorSeerPolicy", "compute_steps_from_mask",
           "WAN21_COEFFICIENTS", "HY15_COEFFICIENTS", "COEFFICIENTS", "RET_WARMUP_STEPS", "wan21_coefficients_key", "polyval"]
