"""`parallelize_wan_dit(model, mesh)`: sequence parallelism (Ulysses, ring, both) applied to an unchanged WanDiT.

Hooks, as torchtitan applies parallelism from outside the model:
- before the first block, the tokens and the RoPE table are cut into this rank's sequence shard
  (padded at the end, `telefuser.distributed.sequence`); later blocks get the same RoPE shard;
- per-token timesteps (Wan2.2 TI2V: `e` [B, S, 6, dim], the head's `t_emb` [B, S, dim]) are sharded
  with the tokens, once per forward, as Wan2.2 chunks e0 with x (a per-video `e` [B, 6, dim] is
  whole on every rank);
- each block's self-attention runs `long_context_attention` over the sp ranks (its `attend` seam);
  cross-attention stays local: the text keys are whole on every rank, so a query shard attends to
  them directly and no exchange is needed;
- after the head (per-token, out_dim * patch values instead of dim: the smallest thing to gather),
  the shards are gathered and the padding dropped, so `forward` returns what one rank returns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from telefuser.ops.long_context import long_context_attention

from .sequence import degree, gather_sequence, shard_sequence, sp_size


class _SequenceState:
    """The full token count of the forward in flight and the RoPE shard made for it."""

    def __init__(self) -> None:
        self.full_len = 0
        self.rope_full: tuple[torch.Tensor, ...] | None = None
        self.rope_shard: tuple[torch.Tensor, ...] | None = None
        self.e_shard: torch.Tensor | None = None  # this forward's per-token modulation shard (or None)


def _shard_rope(state: _SequenceState, rope: tuple[torch.Tensor, ...], mesh: DeviceMesh) -> tuple[torch.Tensor, ...]:
    if state.rope_full is None or any(a is not b for a, b in zip(rope, state.rope_full)):
        state.rope_full = rope
        state.rope_shard = tuple(shard_sequence(t, 0, mesh) for t in rope)
    assert state.rope_shard is not None
    return state.rope_shard


def parallelize_wan_dit(model: nn.Module, mesh: DeviceMesh, ulysses_overlap: bool = True) -> nn.Module:
    """Make `model` (a WanDiT) run sequence-parallel over the mesh's sp_ring x sp_ulysses ranks, in place.
    `ulysses_overlap`: Ulysses' all-to-alls pipelined with the attention of head groups (`long_context_attention`'s
    `overlap`; off only to measure what it saves)."""
    if sp_size(mesh) == 1:
        return model
    heads = model.blocks[0].self_attn.num_heads  # this rank's heads: fewer under tensor parallelism
    ulysses = degree(mesh, "sp_ulysses")
    if heads % ulysses:
        raise ValueError(f"Ulysses degree {ulysses} does not divide the DiT's {heads} attention heads"
                         f"{' held by this rank' if heads != model.config.num_heads else ''}")
    state = _SequenceState()

    def first_block(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, e, context, rope, *rest = args
        state.full_len = x.shape[1]
        state.e_shard = shard_sequence(e, 1, mesh) if e.dim() == 4 else None  # per token: [B, S, 6, dim]
        return (shard_sequence(x, 1, mesh), _shard_e(e), context, _shard_rope(state, rope, mesh), *rest)

    def _shard_e(e: torch.Tensor) -> torch.Tensor:
        return state.e_shard if e.dim() == 4 and state.e_shard is not None else e

    def later_block(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, e, context, rope, *rest = args
        return (x, _shard_e(e), context, _shard_rope(state, rope, mesh), *rest)

    def shard_head(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, t_emb = args
        return (x, shard_sequence(t_emb, 1, mesh) if t_emb.dim() == 3 else t_emb)  # per token: [B, S, dim]

    def gather_head(_module: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        state.e_shard = None
        return gather_sequence(out, 1, mesh, state.full_len)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return long_context_attention(q, k, v, device_mesh=mesh, seq_len=state.full_len, overlap=ulysses_overlap)

    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(first_block if index == 0 else later_block)
        block.self_attn.attend = attend
    model.head.register_forward_pre_hook(shard_head)
    model.head.register_forward_hook(gather_head)
    return model
