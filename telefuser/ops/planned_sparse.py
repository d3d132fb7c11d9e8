"""The plan's sparse self-attention: the runtime's wrapper around a DiT block's `attend` seam enters
`planned_sparse(config, grid, step, layer)`, and `telefuser.ops.attention`'s RADIAL_ATTN / LOCAL_SPARSE_ATTN (and
SAGE_ATTN_*) runner asks `planned_self_attention` for the block-sparse output (None: a dense step or layer, or a
call outside the seam such as cross-attention, which then runs dense); SSTA_ATTN's (and SAGE_ATTN_*'s beside an
"ssta" pattern) asks `telefuser.ops.ssta.planned_ssta`."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, NamedTuple, Optional

import torch

from .sparse_attention import Grid, block_layout_for, sparse_attention, use_dense


class PlannedSparse(NamedTuple):
    """The self-attention call in flight under a plan's sparse pattern (set by the runtime's wrapper around a
    block's `attend` seam, `planned_sparse`): the config, the token grid, the step and the block index."""

    config: Any
    grid: Grid
    step_index: int
    layer_index: int


_PLANNED: "contextvars.ContextVar[Optional[PlannedSparse]]" = contextvars.ContextVar("telefuser_planned_sparse",
                                                                                    default=None)


@contextlib.contextmanager
def planned_sparse(config: Any, grid: Grid, step_index: int, layer_index: int):
    """Within it, `attention()` with a sparse backend (RADIAL_ATTN, LOCAL_SPARSE_ATTN) or a quantised one
    (SAGE_ATTN_*: its block-sparse mode) runs this self-attention block-sparse (`planned_self_attention`); outside
    it (cross-attention) those backends run dense (SDPA; the quantised runner its dense rules)."""
    token = _PLANNED.set(PlannedSparse(config, tuple(int(x) for x in grid), int(step_index), int(layer_index)))
    try:
        yield
    finally:
        _PLANNED.reset(token)


def current() -> Optional[PlannedSparse]:
    """The planned self-attention call in flight, or None outside `planned_sparse`."""
    return _PLANNED.get()


def planned_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                           quantized: Optional[str] = None) -> Optional[torch.Tensor]:
    """The block-sparse output of q [B, Sq, N, D] over k, v [B, Sk, N, D] (BSND) under `planned_sparse`, or None
    where it does not apply (no planned call, a dense step or layer: the caller runs dense attention). The queries
    may be padded past the grid's tokens (Ulysses pads the sequence; the keys arrive cut to the real tokens): padded
    rows get 0. The kernel on CUDA, the PyTorch reference elsewhere (on the CPU, as the plan's dispatch says).
    `quantized`: the SAGE_ATTN_* variant the plan's attention runs (its block-sparse mode), None: 16 bits."""
    planned = _PLANNED.get()
    if planned is None or getattr(planned.config, "sparse_impl", None) == "ssta" \
            or use_dense(planned.step_index, planned.layer_index, planned.config):
        return None  # (SSTA, HunyuanVideo-1.5's joint attention, is `ops.ssta.planned_ssta`'s)
    tokens = planned.grid[0] * planned.grid[1] * planned.grid[2]
    if q.shape[1] < tokens or k.shape[1] < tokens:
        raise ValueError(f"sparse attention over a grid of {tokens} tokens got {q.shape[1]} queries and "
                         f"{k.shape[1]} keys: a sequence shard (ring attention) cannot take a global mask")
    layout = block_layout_for(planned.config, planned.grid, q.device)
    inner = sparse_attention(q[:, :tokens], k[:, :tokens], v[:, :tokens], layout=layout, scale=scale,
                             use_kernel=q.is_cuda, quantized=quantized)
    if q.shape[1] == tokens:
        return inner
    out = q.new_zeros(q.shape)
    out[:, :tokens] = inner
    return out
