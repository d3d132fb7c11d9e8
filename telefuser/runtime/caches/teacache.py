"""TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
arXiv:2411.19108), as its authors run it on Wan2.1 (ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py)
and LightX2V on HunyuanVideo-1.5 (the same rule on another input, below):

- per CFG branch, the relative L1 change of the block stack's timestep input since the previous call,
  rel = mean|inp - inp_prev| / mean|inp_prev|, where inp is the time embedding `e` (Wan's [B, dim]
  `time_embedding` output; `e0`, the [B, 6, dim] time projection every block is modulated with, in the
  "ret steps" variant), is rescaled by the published polynomial poly(rel) (numpy.poly1d order: highest power
  first) and accumulated;
- while the accumulated value stays under `threshold` the step reuses the cached residual of the whole block
  stack (blocks 0 .. L-1); reaching it, the step computes and the accumulator restarts at 0; the previous
  input is updated on every call, computed or reused;
- the first step computes (there is nothing to compare with; the "ret steps" variant computes its first 5),
  and the reference also computes the last step (`final_steps=1` with `num_inference_steps` here).

The polynomials were fitted by TeaCache's authors on Wan2.1's own checkpoints; they rescale a change of the
timestep embedding into the expected change of the output. They are facts of those models: other models
(Wan2.2, distilled schedules) need their own fit, and random weights (the tiny model) make them meaningless
for quality, though not for the mechanism the tests check. HunyuanVideo-1.5's fits (LightX2V's, per task and
resolution) rescale the change of a different input, the first double-stream block's modulated video stream
LayerNorm(img) * (1 + scale1) + shift1 (input "modulated"); its first and last steps compute, as Wan's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from telefuser.schema.teacache_fits import COEFFICIENTS, HY15_COEFFICIENTS, WAN21_COEFFICIENTS  # noqa: F401 (re-exported)

from .base import CachePolicy, CallContext, StepCache, relative_l1

INPUTS = ("t_emb", "e0", "modulated")
RET_WARMUP_STEPS = 5  # the "ret steps" variant computes its first 5 steps (TeaCache4Wan2.1: ret_steps = 5)


def wan21_coefficients_key(dim: int, model_type: str, height: Optional[int] = None, ret_steps: bool = False) -> str:
    """The published polynomial for a Wan2.1 DiT: by width (1536: 1.3B, 5120: 14B) and model type; I2V by the
    video height (480p / 720p fits). Raises for a model the authors did not fit."""
    if model_type == "t2v" and dim in (1536, 5120):
        key = "wan2.1_t2v_1.3b" if dim == 1536 else "wan2.1_t2v_14b"
    elif model_type == "i2v" and dim == 5120 and height is not None:
        if ret_steps:
            raise ValueError("TeaCache publishes no 'ret steps' polynomial for Wan2.1 I2V")
        return "wan2.1_i2v_14b_720p" if height >= 720 else "wan2.1_i2v_14b_480p"
    else:
        raise ValueError(f"TeaCache publishes no Wan2.1 polynomial for a {model_type} DiT of width {dim}"
                         + (" (I2V needs the video height)" if model_type == "i2v" and height is None else "")
                         + "; give the coefficients explicitly")
    return key + "_ret" if ret_steps else key


def polyval(coefficients: Sequence[float], x: float) -> float:
    """numpy.poly1d(coefficients)(x): highest power first (Horner)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


class TeaCachePolicy(CachePolicy):
    name = "teacache"
    first_blocks = 0

    def __init__(self, threshold: float, coefficients: Sequence[float] | str, input: str = "t_emb") -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if input not in INPUTS:
            raise ValueError(f"TeaCache's input is 't_emb' (Wan's e), 'e0' (Wan's time projection) or 'modulated' (the "
                             f"DiT's teacache_input: HunyuanVideo-1.5's first block's modulated stream), got {input!r}")
        self.threshold = float(threshold)
        self.coefficients = tuple(COEFFICIENTS[coefficients] if isinstance(coefficients, str) else coefficients)
        self.input = input

    def decide(self, cache: StepCache, ctx: CallContext, x: torch.Tensor, forced: bool) -> bool:
        sums = None
        if self.input == "modulated":  # the video stream: a shard per rank under sequence parallelism
            inp, sums = cache.dit.teacache_input(ctx.block_args), cache.reduce_sums
        else:
            t_emb, e0 = cache.dit.time_embeddings(ctx.t)
            inp = t_emb if self.input == "t_emb" else e0
        history = ctx.state.policy
        previous = history.get("input")
        history["input"] = inp
        if forced or previous is None or previous.shape != inp.shape:
            history["accumulated"] = 0.0
            return True
        accumulated = history.get("accumulated", 0.0) + polyval(self.coefficients, relative_l1(inp, previous, sums))
        # threshold 0 never reuses, even where a polynomial is negative near 0 (the 14B fits are)
        if self.threshold > 0 and accumulated < self.threshold:
            history["accumulated"] = accumulated
            return False
        history["accumulated"] = 0.0
        return True
