"""Sequence sharding over the sequence-parallel ranks (ring outside, Ulysses inside).

A sequence of S tokens is padded at its end to a multiple of the sp world size P and split into P
contiguous shards; sp rank r = ring_index * ulysses_degree + ulysses_index holds tokens
[r * S_local, (r + 1) * S_local). `telefuser.ops.long_context.long_context_attention` relies on
that layout to drop padded keys, and gathering (Ulysses first, then ring) restores the order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

SP_DIMS = ("sp_ring", "sp_ulysses")  # outer, inner


def degree(mesh: DeviceMesh | None, dim: str) -> int:
    if mesh is None or dim not in (mesh.mesh_dim_names or ()):
        return 1
    return mesh.size(mesh.mesh_dim_names.index(dim))


def local_index(mesh: DeviceMesh, dim: str) -> int:
    return mesh.get_local_rank(dim) if degree(mesh, dim) > 1 else 0


def sp_size(mesh: DeviceMesh | None) -> int:
    return degree(mesh, "sp_ring") * degree(mesh, "sp_ulysses")


def sp_rank(mesh: DeviceMesh) -> int:
    return local_index(mesh, "sp_ring") * degree(mesh, "sp_ulysses") + local_index(mesh, "sp_ulysses")


def shard_length(full_len: int, mesh: DeviceMesh | None) -> int:
    """Tokens per shard: ceil(full_len / P)."""
    return -(-full_len // sp_size(mesh))


def shard_sequence(x: torch.Tensor, dim: int, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's shard of `x` along `dim`, zero-padded at the end of the sequence."""
    full = x.shape[dim]
    local = shard_length(full, mesh)
    start = sp_rank(mesh) * local
    piece = x.narrow(dim, min(start, full), max(0, min(local, full - start)))
    if piece.shape[dim] < local:
        pad_shape = list(x.shape)
        pad_shape[dim] = local - piece.shape[dim]
        piece = torch.cat([piece, x.new_zeros(pad_shape)], dim=dim)
    return piece.contiguous()


def _all_gather(x: torch.Tensor, dim: int, mesh: DeviceMesh, mesh_dim: str) -> torch.Tensor:
    n = degree(mesh, mesh_dim)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=mesh.get_group(mesh_dim))
    return torch.cat(parts, dim=dim)


def gather_sequence(x: torch.Tensor, dim: int, mesh: DeviceMesh, full_len: int) -> torch.Tensor:
    """The whole sequence from every rank's shard, padding removed (the inverse of shard_sequence)."""
    x = _all_gather(_all_gather(x, dim, mesh, "sp_ulysses"), dim, mesh, "sp_ring")
    return x.narrow(dim, 0, full_len)
