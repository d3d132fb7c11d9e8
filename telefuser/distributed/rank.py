"""This process's place in the plan's mesh: joining the process group (spawned local ranks or torchrun),
the device it drives, and the few collectives the pipeline stages need."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from telefuser.errors import PlanError
from telefuser.schema.plan import Plan

from .mesh import device_mesh_from_plan
from .sequence import degree


@dataclass
class RankContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Optional[DeviceMesh] = None
    coords: dict[str, int] = field(default_factory=dict)
    # The ranks that make one video together (every rank with this rank's dp coordinate) and their lead.
    replica_group: Optional[dist.ProcessGroup] = None
    replica_lead: int = 0

    @property
    def is_writer(self) -> bool:
        """The lead of each dp replica alone encodes text, decodes and writes; rank 0 also prints."""
        return self.rank == self.replica_lead

    @property
    def dp_index(self) -> int:
        return self.coords.get("dp", 0)

    def degree(self, dim: str) -> int:
        return degree(self.mesh, dim)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The replica lead's `tensor` on every rank of its replica (others pass a buffer of its shape and dtype)."""
        if self.world_size // self.degree("dp") > 1:
            dist.broadcast(tensor, src=self.replica_lead, group=self.replica_group)
        return tensor

    def gather_to_rank0(self, value: object) -> list[object]:
        """Every rank's `value` on rank 0 (in rank order), [] elsewhere."""
        if self.world_size == 1:
            return [value]
        values: list[object] = [None] * self.world_size if self.rank == 0 else []
        dist.gather_object(value, values if self.rank == 0 else None, dst=0)
        return values

    def all_gather(self, tensor: torch.Tensor, dim: str) -> list[torch.Tensor]:
        """Every rank's `tensor` along mesh dimension `dim`, in coordinate order."""
        if self.degree(dim) == 1:
            return [tensor]
        assert self.mesh is not None
        parts = [torch.empty_like(tensor) for _ in range(self.degree(dim))]
        dist.all_gather(parts, tensor.contiguous(), group=self.mesh.get_group(dim))
        return parts

    def close(self) -> None:
        if self.world_size > 1:
            _leave()


def _leave() -> None:
    """Tear the process group down once every rank has finished with it. Without the barrier a rank that finishes
    first closes its gloo connections while a peer's last collective may still use them, and that peer's gloo thread
    can abort the process (seen rarely on loaded CPUs: SIGABRT, "terminate called without an active exception")."""
    if dist.is_initialized():
        if not _failed:  # a rank leaving on an exception must not wait: its peers may be stuck in a collective
            try:
                dist.barrier()
            except RuntimeError:  # a peer is already gone (it failed or was stopped): nothing left to wait for
                pass
        dist.destroy_process_group()


_failed = False


def _note_failure(previous):
    """sys.excepthook that records an uncaught exception (it runs before the atexit handlers) and then reports it."""
    def hook(*exc_info) -> None:
        global _failed
        _failed = True
        previous(*exc_info)
    return hook


def launched_world() -> Optional[tuple[int, int]]:
    """(rank, world size) when this process was started as one rank (by telefuser-run or torchrun)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def check_world(plan: Plan) -> Optional[tuple[int, int]]:
    """The launched (rank, world size), refused before anything loads when it does not fit the plan."""
    launched = launched_world()
    world = plan.mesh.world_size
    if launched is None:
        if world > 1:
            raise PlanError(
                f"the plan runs on {world} ranks ({_degrees(plan)}); start it with telefuser-run (which starts "
                f"the ranks itself) or torchrun --nproc-per-node {world}.")
        return None
    if launched[1] != world:
        raise PlanError(
            f"this run was started with {launched[1]} processes but the plan has {world} ranks ({_degrees(plan)}); "
            f"start {world} (torchrun --nproc-per-node {world}), or recompile the recipe for {launched[1]} devices.")
    return launched


def _degrees(plan: Plan) -> str:
    return " x ".join(f"{d}={n}" for d, n in plan.mesh.degrees.items() if n > 1) or "1"


def join(plan: Plan) -> RankContext:
    """Join the plan's mesh: one rank needs no process group; several build it and their DeviceMesh."""
    launched = check_world(plan)
    if launched is None or launched[1] == 1:
        return RankContext(device=torch.device(plan.device))
    rank, world = launched
    info = plan.mesh.ranks[rank]
    if plan.device == "cuda":
        torch.cuda.set_device(info.device_id)
        device = torch.device("cuda", info.device_id)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=plan.layer2_inference_config.parallel_config.timeout)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if plan.device == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timeout, **({"device_id": device} if plan.device == "cuda" else {}))
        # Python API users under torchrun need not call close(): a process group left alive at exit
        # aborts the interpreter (gloo's P2P threads), so the group this call made is left at exit.
        atexit.register(_leave)
        sys.excepthook = _note_failure(sys.excepthook)
    mesh = device_mesh_from_plan(plan.mesh, plan.device)
    replicas = [[r.rank for r in plan.mesh.ranks if r.coords.get("dp", 0) == d] for d in range(plan.mesh.degrees["dp"])]
    mine = replicas[info.coords.get("dp", 0)]
    group = None
    if len(replicas) > 1:  # every rank takes part in creating every group
        group = [dist.new_group(ranks) for ranks in replicas][info.coords.get("dp", 0)]
    return RankContext(rank=rank, world_size=world, device=device, mesh=mesh, coords=dict(info.coords),
                       replica_group=group, replica_lead=min(mine))
