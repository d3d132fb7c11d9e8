"""The step-cache engine: reuse the residual of the DiT's block stack on steps judged close enough to the
last computed one, applied from outside an unchanged DiT (as diffusers' hooks do: the module's
`forward` and its blocks' `forward` are replaced on the instance, the class is untouched, `detach` puts
them back). The DiT says what its stack is through `residual_stack()` (telefuser.models.block_stack): its
blocks in run order and where the residual's stream sits in each block's arguments and output (WanDiT: the
tokens in and out; HunyuanVideo15DiT: the video tokens of its double-stream blocks' (img, txt) and the front
of its single-stream blocks' joined sequence), so nothing here is per family.

What runs, per DiT call:
- The DiT's own forward (patch embedding, time and text embeddings, blocks, head) runs as always; only the
  blocks from `first_blocks` on are short-cut. Blocks `0 .. first_blocks-1` always run (0 for TeaCache and
  the static schedule, 1 for the first-block cache: cache-dit's DBCache with Fn = first_blocks, Bn = 0).
- Block `first_blocks` asks the policy whether to compute. Computing: the blocks run unchanged and the
  residual `out(last block) - in(block first_blocks)` is kept for this branch. Reusing: that block returns
  `x + residual` and the blocks after it return their input (identity).
- A computed step is bit-identical to the DiT without the cache (the cache only reads the blocks' inputs
  and outputs), so `threshold = 0`, which never reuses, gives exactly the uncached output.

Steps and branches. Each call is one (step, branch). Without help the cache reads them off the calls as the
denoise stage makes them: a new timestep value starts a step, the calls within one step are the branches in
call order (`branch_names`, default ("cond", "uncond"): `guided` calls the conditional prediction first); a
timestep above the previous one starts a new video (`reset`). `begin_step(index)` sets the step index
explicitly (then steps follow the caller, e.g. the plan's global index under the MoE split), `reset()`
forgets everything (call it per video). State (the residual, the policy's history, counters) is kept per
branch: the conditional and unconditional predictions differ, so each is compared with itself (TeaCache's
even/odd calls). Under cfg parallel each rank runs one branch and decides for it alone (pass its name as
the only branch): no exchange is needed, since the DiT holds no collective between cfg ranks. Under
sequence parallel a decision from sharded activations must agree across the ranks (else one rank skips
the blocks' all-to-alls that another runs): the first-block policy sums its numerator and denominator
through `reduce_sums` (e.g. an all-reduce over the sequence group); TeaCache's input, the time embedding,
is the same on every rank.

Forced computes, whatever the policy says: the first `warmup_steps` steps, the last `final_steps` steps
(when `num_inference_steps` is known), a step after `max_consecutive_skips` reuses in a row, and any step
without a cached residual of the same shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch

from telefuser.models.block_stack import StackBlock


@dataclasses.dataclass
class BranchState:
    """What one CFG branch remembers between its steps."""

    residual: Optional[torch.Tensor] = None  # out(last block) - in(block first_blocks), from the last computed step
    consecutive_reuses: int = 0
    computed: int = 0
    reused: int = 0
    policy: dict[str, Any] = dataclasses.field(default_factory=dict)  # the policy's own history


@dataclasses.dataclass
class CallContext:
    """The DiT call in flight: its step, branch, inputs the policies read, and the blocks' bookkeeping."""

    step: int
    branch: str
    state: BranchState
    t: torch.Tensor
    stack_input: Optional[torch.Tensor] = None  # the input stream of block first_blocks (computing)
    first_input: Optional[torch.Tensor] = None  # the input stream of block 0
    block_args: tuple[Any, ...] = ()  # block first_blocks' positional arguments (a policy may read them)
    reusing: bool = False


class CachePolicy:
    """Decides, at block `first_blocks`, whether this step computes the rest of the stack."""

    name = "policy"
    first_blocks = 0
    threshold = 0.0

    def decide(self, cache: "StepCache", ctx: CallContext, x: torch.Tensor, forced: bool) -> bool:
        """Whether this call computes the stack from block `first_blocks` on (`x` is that block's input). Asked
        on every call, also when `forced` (then it must return True), so the policy keeps its history."""
        raise NotImplementedError

    def after_compute(self, cache: "StepCache", ctx: CallContext) -> None:
        """Called once the stack has run on a computed step (the policy may record what it compared)."""

    def reuse_residual(self, cache: "StepCache", ctx: CallContext) -> torch.Tensor:
        """What a reused step adds for the skipped blocks: the last computed residual (a forecast in TaylorSeer)."""
        return ctx.state.residual


class StepCache:
    """A step cache attached to one DiT (see the module's docstring). `stats()` gives computed / reused steps per
    branch; `decisions` lists (step, branch, computed) per call since the last `reset`."""

    def __init__(self, dit: torch.nn.Module, policy: CachePolicy, *, warmup_steps: int = 0,
                 max_consecutive_skips: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 final_steps: int = 0, branch_names: Sequence[str] = ("cond", "uncond"),
                 reduce_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        stack = getattr(dit, "residual_stack", None)
        self.stack: list[StackBlock] = list(stack()) if callable(stack) else []
        if len(self.stack) <= policy.first_blocks:
            raise ValueError(f"a step cache needs a DiT whose residual_stack() has more than {policy.first_blocks} "
                             f"blocks; {type(dit).__name__} has {len(self.stack)}")
        if warmup_steps < 0 or final_steps < 0 or (max_consecutive_skips is not None and max_consecutive_skips < 0):
            raise ValueError("warmup_steps, final_steps and max_consecutive_skips must not be negative")
        if final_steps and num_inference_steps is None:
            raise ValueError("final_steps needs num_inference_steps (which steps are the last ones)")
        if not branch_names:
            raise ValueError("branch_names needs at least one name")
        self.dit = dit
        self.policy = policy
        self.warmup_steps = warmup_steps
        self.max_consecutive_skips = max_consecutive_skips
        self.num_inference_steps = num_inference_steps
        self.final_steps = final_steps
        self.branch_names = tuple(branch_names)
        self.reduce_sums = reduce_sums
        self._originals: list[tuple[torch.nn.Module, Any, bool]] = []
        self.reset()

    # ------------------------------------------------------------ lifecycle

    def reset(self) -> None:
        """Forget every branch's state and the step counting: a new video (or prompt) starts."""
        self.branches: dict[str, BranchState] = {}
        self.decisions: list[tuple[int, str, bool]] = []
        self._step = -1
        self._last_t: Optional[float] = None
        self._call_in_step = 0
        self._pending_step: Optional[int] = None
        self._ctx: Optional[CallContext] = None

    def begin_step(self, index: int) -> None:
        """The next DiT calls belong to step `index` (their branches in call order): explicit step counting."""
        self._pending_step = int(index)

    def attach(self) -> "StepCache":
        if self._originals:
            return self
        if getattr(self.dit, "_telefuser_step_cache", None) is not None:
            raise ValueError("this DiT already has a step cache; detach it first")
        self._patch(self.dit, self._dit_forward)
        for index, entry in enumerate(self.stack):
            self._patch(entry.module, self._block_forward(index, entry, entry.module.forward))
        self.dit._telefuser_step_cache = self
        return self

    def detach(self) -> None:
        """Put the DiT's and the blocks' own forwards back."""
        for module, forward, own in reversed(self._originals):
            if own:
                module.forward = forward
            else:
                del module.forward
        self._originals = []
        self.dit._telefuser_step_cache = None

    def _patch(self, module: torch.nn.Module, forward: Callable) -> None:
        own = "forward" in module.__dict__  # someone already set an instance forward: restore it on detach
        self._originals.append((module, module.__dict__.get("forward"), own))
        if module is self.dit:
            self._dit_original = module.forward
        module.forward = forward

    # ------------------------------------------------------------ reporting

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: {"computed": s.computed, "reused": s.reused} for name, s in self.branches.items()}

    # ------------------------------------------------------------ the DiT call

    def _branch_for_call(self, t: torch.Tensor) -> tuple[int, str]:
        t_value = float(t.detach().float().max())  # per-token t (TI2V): its largest value is the step's t
        if self._pending_step is not None:
            self._step, self._call_in_step, self._pending_step = self._pending_step, 0, None
        elif self._last_t is None or t_value != self._last_t:
            if self._last_t is not None and t_value > self._last_t:
                self.reset()  # the timesteps went back up: a new video
            self._step += 1
            self._call_in_step = 0
        else:
            self._call_in_step += 1
        self._last_t = t_value
        names = self.branch_names
        name = names[self._call_in_step] if self._call_in_step < len(names) else f"branch{self._call_in_step}"
        return self._step, name

    def _dit_forward(self, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        step, name = self._branch_for_call(t)
        state = self.branches.setdefault(name, BranchState())
        self._ctx = CallContext(step=step, branch=name, state=state, t=t)
        try:
            return self._dit_original(x, t, *args, **kwargs)
        finally:
            self._ctx = None

    def forced_compute(self, ctx: CallContext, x: torch.Tensor) -> bool:
        s = ctx.state
        if ctx.step < self.warmup_steps:
            return True
        if self.num_inference_steps is not None and ctx.step >= self.num_inference_steps - self.final_steps:
            return True
        if self.max_consecutive_skips is not None and s.consecutive_reuses >= self.max_consecutive_skips:
            return True
        return s.residual is None or s.residual.shape != x.shape

    def _block_forward(self, index: int, entry: StackBlock, forward: Callable) -> Callable:
        first, last = self.policy.first_blocks, len(self.stack) - 1

        def run(*args: Any, **kwargs: Any) -> Any:
            ctx = self._ctx
            if ctx is None:  # a block called outside a DiT call (or the cache is between videos): plain
                return forward(*args, **kwargs)
            if index == 0:
                ctx.first_input = entry.stream_in(args)
            if index == first:
                x = entry.stream_in(args)
                ctx.block_args = args
                forced = self.forced_compute(ctx, x)
                compute = self.policy.decide(self, ctx, x, forced) or forced
                s = ctx.state
                self.decisions.append((ctx.step, ctx.branch, compute))
                if compute:
                    s.computed += 1
                    s.consecutive_reuses = 0
                    ctx.stack_input = x
                else:
                    s.reused += 1
                    s.consecutive_reuses += 1
                    ctx.reusing = True
                    return entry.replace(args, x + self.policy.reuse_residual(self, ctx))
            elif index > first and ctx.reusing:
                return entry.replace(args, None)  # the residual added at block `first` stands for this block
            out = forward(*args, **kwargs)
            if index == last and ctx.stack_input is not None:
                ctx.state.residual = entry.stream_out(args, out) - ctx.stack_input
                self.policy.after_compute(self, ctx)
            return out

        return run


def relative_l1(new: torch.Tensor, old: torch.Tensor,
                reduce_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> float:
    """mean|new - old| / mean|old| (cache-dit's and TeaCache's relative L1), in float32; `reduce_sums` sums the
    numerator and denominator across ranks (sharded activations) before the division."""
    sums = torch.stack([(new.float() - old.float()).abs().sum(), old.float().abs().sum()])
    if reduce_sums is not None:
        sums = reduce_sums(sums)
    num, den = sums.tolist()
    return num / den if den > 0 else float("inf")
