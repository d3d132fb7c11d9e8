"""The plan's sparse attention and step caches, applied around an unchanged DiT for one denoise span.

The compiler resolved both into the denoise stage's params (compiler/skip_work.py): `sparse_attention[model]`
and `step_cache[model]`. `skip_work(ctx, stage, model, dit, cfg_active)` attaches them when the DiT becomes
active in the denoise stage and takes them off afterwards, so every video (and every MoE expert's span) starts
with empty caches:

- sparse attention: each block's `attend` seam (`dit.attention_seams()`: the model's own, or sequence
  parallelism's, which was set at load) is wrapped to run inside `ops.planned_sparse.planned_sparse(config, grid,
  step, layer)`; the attention backend the plan dispatches (RADIAL_ATTN / LOCAL_SPARSE_ATTN / SSTA_ATTN, or
  SAGE_ATTN_* in its block-sparse mode) then runs that self-attention block-sparse, Ulysses' head slices included
  (between its all-to-alls: whole sequences, the mask unchanged).
  The token grid is read off the DiT's input by a forward pre-hook; the step index comes from `begin_step`.
- step caches: `runtime.caches.apply_step_cache` with the plan's arguments, told each step's global index
  (`begin_step`, so `compute_steps`, warm-up and final steps count the denoise loop's steps, MoE split or not).
  Branches: ("cond", "uncond") in the order `guided` calls them; under cfg parallel each rank runs and decides
  for its own branch alone (nothing inside the DiT is exchanged between cfg ranks, so their decisions need not
  agree); under sequence parallelism the first-block cache sums its L1 terms over the sp ranks so that every
  rank of a sequence decides alike. The counts go to `Timings.step_cache[model][branch]`, both branches on
  rank 0 (gathered over the cfg ranks).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import torch

from telefuser.schema.plan import Stage


class _SparseWrapper:
    def __init__(self, dit: torch.nn.Module, record: dict[str, Any]) -> None:
        from telefuser.ops.planned_sparse import planned_sparse

        self.config = SimpleNamespace(**record)
        self.step = 0
        self.grid: tuple[int, int, int] = (1, 1, 1)
        self.dit = dit
        patch = tuple(int(p) for p in dit.config.patch_size)

        def grab_grid(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))  # the latent, the forward's first argument
            self.grid = (x.shape[2] // patch[0], x.shape[3] // patch[1], x.shape[4] // patch[2])

        self.hook = dit.register_forward_pre_hook(grab_grid, with_kwargs=True)
        self.restore: list[tuple[torch.nn.Module, Any]] = []
        for index, seam in enumerate(dit.attention_seams()):
            inner = seam.attend
            self.restore.append((seam, seam.__dict__.get("attend")))

            def attend(*args: Any, index: int = index, inner: Any = inner) -> torch.Tensor:
                with planned_sparse(self.config, self.grid, self.step, index):
                    return inner(*args)

            seam.attend = attend

    def detach(self) -> None:
        self.hook.remove()
        for attn, own in self.restore:
            if own is None:
                del attn.attend
            else:
                attn.attend = own


def _sequence_sum(mesh: Any):
    """Sum a small tensor over the sequence-parallel ranks (the first-block cache's L1 terms)."""
    import torch.distributed as dist

    from telefuser.distributed.sequence import degree

    dims = [d for d in ("sp_ulysses", "sp_ring") if degree(mesh, d) > 1]
    if not dims:
        return None

    def reduce(sums: torch.Tensor) -> torch.Tensor:
        for d in dims:
            dist.all_reduce(sums, group=mesh.get_group(d))
        return sums

    return reduce


class SkipWork:
    """What `skip_work` yields: `begin_step(i)` before each step's DiT calls."""

    def __init__(self, sparse: Optional[_SparseWrapper], cache: Any) -> None:
        self.sparse, self.cache = sparse, cache

    def begin_step(self, index: int) -> None:
        if self.sparse is not None:
            self.sparse.step = index
        if self.cache is not None:
            self.cache.begin_step(index)


@contextlib.contextmanager
def skip_work(ctx: Any, state: Any, stage: Stage, model: str, dit: torch.nn.Module,
              cfg_active: bool) -> Iterator[SkipWork]:
    """The plan's sparse attention and step cache around `dit` for one denoise span (see the module)."""
    sparse_record = stage.params.get("sparse_attention", {}).get(model)
    cache_record = stage.params.get("step_cache", {}).get(model)
    sparse = _SparseWrapper(dit, sparse_record) if sparse_record else None
    cache = None
    split_cfg = cfg_active and ctx.rank.degree("cfg") == 2
    try:
        if cache_record:
            from .caches import apply_step_cache

            r = cache_record
            branches = (("cond",) if ctx.rank.coords.get("cfg", 0) == 0 else ("uncond",)) if split_cfg \
                else ("cond", "uncond")
            cache = apply_step_cache(
                dit, r["method"], float(r.get("threshold", 0.0)), coefficients=r.get("coefficients"),
                teacache_input=r.get("teacache_input", "t_emb"), first_blocks=int(r.get("first_blocks", 1)),
                compute_steps=r.get("compute_steps"), interval=int(r.get("interval", 2)),
                order=int(r.get("order", 1)), warmup_steps=int(r["warmup_steps"]),
                max_consecutive_skips=r.get("max_consecutive_skips"),
                num_inference_steps=int(r["num_inference_steps"]), final_steps=int(r.get("final_steps", 0)),
                branch_names=branches, reduce_sums=_sequence_sum(ctx.rank.mesh) if ctx.rank.mesh is not None else None)
        yield SkipWork(sparse, cache)
        if cache is not None:
            _record_stats(ctx, state, model, cache.stats(), split_cfg)
    finally:
        if cache is not None:
            cache.detach()
        if sparse is not None:
            sparse.detach()


def _record_stats(ctx: Any, state: Any, model: str, stats: dict[str, dict[str, int]], split_cfg: bool) -> None:
    if split_cfg:  # each cfg rank holds its own branch: gather both (every rank of the pair calls this)
        mine = stats.get("uncond" if ctx.rank.coords.get("cfg", 0) else "cond", {"computed": 0, "reused": 0})
        counts = torch.tensor([mine["computed"], mine["reused"]], dtype=torch.int64, device=ctx.device)
        cond, uncond = ctx.rank.all_gather(counts, "cfg")
        stats = {name: {"computed": int(c[0]), "reused": int(c[1])} for name, c in (("cond", cond), ("uncond", uncond))}
    per_model = state.timings.step_cache.setdefault(model, {})
    for branch, counts in stats.items():
        merged = per_model.setdefault(branch, {"computed": 0, "reused": 0})
        merged["computed"] += counts["computed"]
        merged["reused"] += counts["reused"]
