"""DeviceMesh from a ParallelConfig (the seed API) or from a plan's mesh (what the runtime uses).

The plan's `mesh.order` and `groups` are the single source of truth: the DeviceMesh is laid out
in that order (row-major, last dimension fastest, as the compiler numbers ranks) and its groups
are checked against the plan's before anything runs on them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from telefuser.errors import PlanError
from telefuser.schema.plan import Mesh
from telefuser.schema.parallel import MESH_ORDER, ParallelConfig


def _device_type(device_type: Optional[str]) -> str:
    return device_type or ("cuda" if torch.cuda.is_available() else "cpu")


def create_device_mesh_from_config(parallel_config: ParallelConfig, device_type: Optional[str] = None) -> DeviceMesh:
    """The mesh of `parallel_config` over the initialised default process group, dimensions named as
    the plan names them (`pp, dp, cfg, sp_ring, sp_ulysses, tp`); the degrees must multiply to the
    world size. Use it with `telefuser.ops.attention.long_context_attention(..., device_mesh=mesh)`."""
    if not dist.is_initialized():
        raise RuntimeError("create_device_mesh_from_config needs torch.distributed initialised "
                           "(run under torchrun, or call dist.init_process_group first)")
    degrees = tuple(parallel_config.degree(d) for d in MESH_ORDER)
    if parallel_config.world_size != dist.get_world_size():
        raise ValueError(f"the parallel degrees multiply to {parallel_config.world_size} "
                         f"({dict(zip(MESH_ORDER, degrees))}) but the world size is {dist.get_world_size()}")
    return init_device_mesh(_device_type(device_type), degrees, mesh_dim_names=MESH_ORDER)


def groups_of(mesh: DeviceMesh, dim: str) -> list[list[int]]:
    """The rank groups along `dim`: ranks that differ only in that coordinate."""
    axis = mesh.mesh_dim_names.index(dim)
    ranks = mesh.mesh.movedim(axis, -1)
    return ranks.reshape(-1, ranks.shape[-1]).tolist()


def device_mesh_from_plan(plan_mesh: Mesh, device_type: Optional[str] = None) -> DeviceMesh:
    """The plan's mesh as a DeviceMesh over the default process group, its groups checked against the plan."""
    shape = tuple(plan_mesh.degrees[d] for d in plan_mesh.order)
    mesh = init_device_mesh(_device_type(device_type), shape, mesh_dim_names=tuple(plan_mesh.order))
    for dim in plan_mesh.order:
        if sorted(map(sorted, groups_of(mesh, dim))) != sorted(map(sorted, plan_mesh.groups[dim])):
            raise PlanError(f"the plan's {dim} groups {plan_mesh.groups[dim]} do not follow its mesh order "
                            f"{plan_mesh.order}; the plan was edited by hand: recompile the recipe.")
    return mesh
