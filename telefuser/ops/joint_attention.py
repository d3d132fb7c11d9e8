"""Sequence-parallel attention with joint tokens: a sharded sequence (video tokens) and a short sequence held whole
on every rank (text / context tokens of an MMDiT block, e.g. HunyuanVideo-1.5's), attending jointly.

`joint_long_context_attention` computes what one rank computes for softmax attention over the concatenation
[whole sequence, joint tokens] (queries and keys both), returning this rank's shard of the sequence's output and
the joint tokens' output, the latter equal on every sequence-parallel rank. Key order does not change attention, so
where the joint keys sit among the sequence's keys is free; the arithmetic order is not the one-rank order, so
results agree to float rounding.

- Ulysses (mesh dim "sp_ulysses"): the sequence shards trade for a head slice by all-to-all, as in
  `long_context_attention`; the joint tokens are already whole, so each rank just takes its head slice of them
  (no communication), runs one attention of [sequence, joint] queries over [valid sequence, valid joint] keys, sends
  the sequence part back by all-to-all and all-gathers the joint part's heads. Ulysses alone pipelines the
  all-to-alls with the attention of head groups, as `long_context_attention` does (`overlap`; the same result).
- Ring (mesh dim "sp_ring"): the sequence's queries merge the joint keys' partial result (the same on every rank)
  first, then the ring's K/V blocks (`long_context._ring_attention` with `start`). The joint queries attend, on each
  ring rank, to the joint keys and to that rank's own K/V block only; the ring ranks' partial results (out, lse) are
  all-gathered and merged in ring order, so every rank holds the same joint output without redundant attention.
- both (USP): Ulysses inside each ring block.

Joint padding: `joint_lengths[b]` valid joint tokens of batch element b, a prefix (None: all valid); the rest are
dropped as keys by slicing (no mask, any backend), per batch element when the lengths differ. Padded joint query
rows still get an output (over the valid keys), as a masked one-rank attention gives them. The sequence's own
padding (at its end, to a multiple of the sp degree) is dropped as in `long_context_attention` (`seq_len`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .attention import attention, backend_name
from .long_context import (RING_DIM, ULYSSES_DIM, _degree, _heads_to_seq, _ring_attention, _seq_to_heads, _sp_degrees,
                           _ulysses_overlapped, _valid_keys, attention_with_lse, merge_lse, ulysses_groups)

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]


def _with_joint_keys(fn: Attend, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                     jk: torch.Tensor, jv: torch.Tensor, lengths: Optional[Sequence[int]]) -> Any:
    """fn(q, [k, valid joint keys], [v, valid joint values]) (k, v None: the joint keys alone), batched when every
    element has the same number of valid joint tokens, else per batch element (outputs concatenated on dim 0)."""
    def keys(b: slice, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k is None or v is None:
            return jk[b, :n], jv[b, :n]
        return torch.cat([k[b], jk[b, :n]], 1), torch.cat([v[b], jv[b, :n]], 1)

    if lengths is None or len(set(lengths)) == 1:
        n = jk.shape[1] if lengths is None else int(lengths[0])
        return fn(q, *keys(slice(None), n))
    parts = [fn(q[i: i + 1], *keys(slice(i, i + 1), int(n))) for i, n in enumerate(lengths)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p, 0) for p in zip(*parts))
    return torch.cat(parts, 0)


def _local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, jq: torch.Tensor, jk: torch.Tensor, jv: torch.Tensor,
           lengths: Optional[Sequence[int]], seq_len_here: int, backend: str,
           scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """No ring: one attention of [sequence, joint] queries over [valid sequence, valid joint] keys."""
    n = q.shape[1]
    out = _with_joint_keys(lambda qb, kb, vb: attention(qb, kb, vb, attention_config=backend, scale=scale),
                           torch.cat([q, jq], 1), k[:, :seq_len_here], v[:, :seq_len_here], jk, jv, lengths)
    return out[:, :n], out[:, n:]


def _ulysses_pipelined(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, jq: torch.Tensor, jk: torch.Tensor,
                       jv: torch.Tensor, lengths: Optional[Sequence[int]], seq_len: int, mesh: DeviceMesh, backend: str,
                       scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses alone, in head groups: each group's exchange in flight behind the previous group's attention
    (`long_context._ulysses_overlapped`); the joint tokens of the group's heads are sliced locally."""
    degree, heads = _degree(mesh, ULYSSES_DIM), q.shape[2]
    groups = ulysses_groups(heads, degree)
    per_group = heads // (degree * groups)
    first = mesh.get_local_rank(ULYSSES_DIM) * (heads // degree)
    valid = _valid_keys(seq_len, 0, q.shape[1] * degree)
    joint_outs: list[torch.Tensor] = []

    def attend(g: int, qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor) -> torch.Tensor:
        at = slice(first + g * per_group, first + (g + 1) * per_group)
        out, joint_out = _local(qg, kg, vg, jq[:, :, at], jk[:, :, at], jv[:, :, at], lengths, valid, backend, scale)
        joint_outs.append(joint_out)
        return out

    out = _ulysses_overlapped(q, k, v, degree, groups, mesh.get_group(ULYSSES_DIM), attend)
    return out, torch.cat(joint_outs, dim=2)  # this rank's heads, in group order


def _ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, jq: torch.Tensor, jk: torch.Tensor, jv: torch.Tensor,
          lengths: Optional[Sequence[int]], seq_len: int, scale: Optional[float], mesh: DeviceMesh,
          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    degree, index, group = _degree(mesh, RING_DIM), mesh.get_local_rank(RING_DIM), mesh.get_group(RING_DIM)

    def with_lse(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_with_lse(qb, kb, vb, scale)

    start = _with_joint_keys(with_lse, q, None, None, jk, jv, lengths)
    out = _ring_attention(q, k, v, seq_len, scale, degree, index, group, backend, start=start)
    # the joint queries: this ring rank's own block, gathered with the others' and merged in ring order
    valid = _valid_keys(seq_len, index, k.shape[1])
    if valid:
        part_out, part_lse = attention_with_lse(jq, k[:, :valid], v[:, :valid], scale)
    else:  # a block of padding only: no keys, the merge's neutral element
        part_out = jq.new_zeros(jq.shape, dtype=torch.float32)
        part_lse = torch.full((jq.shape[0], jq.shape[2], jq.shape[1]), float("-inf"), device=jq.device)
    flat = torch.cat([part_out.float().reshape(-1), part_lse.reshape(-1)])
    gathered = [torch.empty_like(flat) for _ in range(degree)]
    dist.all_gather(gathered, flat, group=group)
    j_out, j_lse = (t.float() for t in _with_joint_keys(with_lse, jq, None, None, jk, jv, lengths))
    size = part_out.numel()
    for piece in gathered:
        j_out, j_lse = merge_lse(j_out, j_lse, piece[:size].view(part_out.shape), piece[size:].view(part_lse.shape))
    return out, j_out.to(q.dtype)


@torch.compiler.disable
def joint_long_context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, joint_q: torch.Tensor,
                                 joint_k: torch.Tensor, joint_v: torch.Tensor, device_mesh: DeviceMesh,
                                 seq_len: Optional[int] = None, joint_lengths: Optional[Sequence[int]] = None,
                                 attention_config: Union[str, Any, None] = None,
                                 scale: Optional[float] = None, overlap: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [sequence, joint tokens] for q, k, v sharded along the sequence ([B, S_local, N, D], BSND,
    padded at the sequence's end; `seq_len` the unpadded total, None: no padding) and joint_q/k/v [B, L, N, D]
    whole and equal on every sequence-parallel rank (`joint_lengths`: valid joint tokens per batch element, a
    prefix; None: all). Returns (this rank's output shard [B, S_local, N, D], the joint output [B, L, N, D], the
    same on every sequence-parallel rank). `overlap`: Ulysses alone pipelines its exchange in head groups."""
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"joint_long_context_attention takes q, k, v as [B, S_local, N, D] with equal B, S_local, N; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if joint_q.dim() != 4 or joint_q.shape != joint_k.shape or joint_q.shape[:3] != joint_v.shape[:3] \
            or joint_q.shape[0] != q.shape[0] or joint_q.shape[2:] != q.shape[2:]:
        raise ValueError(f"the joint q, k, v must be [B, L, N, D] with q's B, N and D; got {tuple(joint_q.shape)}, "
                         f"{tuple(joint_k.shape)}, {tuple(joint_v.shape)} for q {tuple(q.shape)}")
    if joint_lengths is not None and (len(joint_lengths) != q.shape[0]
                                      or not all(0 < int(n) <= joint_q.shape[1] for n in joint_lengths)):
        raise ValueError(f"joint_lengths {list(joint_lengths)} must give 1..{joint_q.shape[1]} valid joint tokens for "
                         f"each of the {q.shape[0]} batch elements")
    if joint_q.shape[1] == 0:
        raise ValueError("joint_long_context_attention needs at least one joint token; use long_context_attention")
    ulysses, ring, seq_len = _sp_degrees(q, device_mesh, seq_len)
    heads = q.shape[2]
    backend = backend_name(attention_config)
    group = device_mesh.get_group(ULYSSES_DIM) if ulysses > 1 else None
    if ulysses > 1 and ring == 1 and overlap:
        out, joint_out = _ulysses_pipelined(q, k, v, joint_q, joint_k, joint_v, joint_lengths, seq_len, device_mesh,
                                            backend, scale)
    else:
        jq, jk, jv = joint_q, joint_k, joint_v
        if ulysses > 1:
            q, k, v = (_seq_to_heads(t, ulysses, group) for t in (q, k, v))
            per_rank = heads // ulysses
            first = device_mesh.get_local_rank(ULYSSES_DIM) * per_rank
            jq, jk, jv = (t[:, :, first: first + per_rank].contiguous() for t in (jq, jk, jv))
        if ring > 1:
            out, joint_out = _ring(q, k, v, jq, jk, jv, joint_lengths, seq_len, scale, device_mesh, backend)
        else:
            out, joint_out = _local(q, k, v, jq, jk, jv, joint_lengths, _valid_keys(seq_len, 0, k.shape[1]), backend,
                                    scale)
        if ulysses > 1:
            out = _heads_to_seq(out.contiguous(), ulysses, group)
    if ulysses > 1:  # the joint tokens' heads, from every Ulysses rank
        heads_of = [torch.empty_like(joint_out) for _ in range(ulysses)]
        dist.all_gather(heads_of, joint_out.contiguous(), group=group)
        joint_out = torch.cat(heads_of, dim=2)
    return out, joint_out
