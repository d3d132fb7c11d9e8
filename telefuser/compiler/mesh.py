"""The parallel mesh: each rank's coordinates and, per dimension, the groups of ranks that talk."""

from __future__ import annotations

import itertools

from telefuser.errors import PlanError
from telefuser.schema.enums import is_dit
from telefuser.schema.plan import Mesh, PlannedModel, RankInfo
from telefuser.schema.parallel import MESH_ORDER, ParallelConfig


def build_mesh(parallel: ParallelConfig, num_devices: int) -> Mesh:
    degrees = {d: parallel.degree(d) for d in MESH_ORDER}
    device_ids = parallel.device_ids or list(range(num_devices))
    sizes = [degrees[d] for d in MESH_ORDER]
    coords_list = list(itertools.product(*(range(s) for s in sizes)))  # row-major: last dim fastest
    ranks = [RankInfo(rank=r, device_id=device_ids[r], coords=dict(zip(MESH_ORDER, c)))
             for r, c in enumerate(coords_list)]
    groups: dict[str, list[list[int]]] = {}
    for axis, dim in enumerate(MESH_ORDER):
        by_rest: dict[tuple[int, ...], list[int]] = {}
        for r, c in enumerate(coords_list):
            by_rest.setdefault(c[:axis] + c[axis + 1:], []).append(r)
        groups[dim] = list(by_rest.values())
    return Mesh(world_size=len(ranks), order=list(MESH_ORDER), degrees=degrees, ranks=ranks, groups=groups)


def check_parallel(parallel: ParallelConfig, models: list[PlannedModel]) -> None:
    """Refuse degrees no runtime can take, before any plan is written."""
    for model in models:
        heads = model.arch.get("num_heads", model.arch.get("heads_num"))  # Wan's name, HunyuanVideo-1.5's
        if not is_dit(model.role) or heads is None:
            continue  # --no-weights without an asserted arch: the runtime checks it before loading
        for dim in ("sp_ulysses", "tp"):
            degree = parallel.degree(dim)
            if heads % degree:
                fits = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 16]
                raise PlanError(
                    f"layer2.parallel_config.{dim}_degree = {degree} does not divide the {heads} attention heads of "
                    f"model {model.name!r}, which {dim} splits across ranks; choose one of {fits} "
                    "(or move devices to sp_ring_degree / cfg_degree)."
                )
        both = parallel.sp_ulysses_degree * parallel.tp_degree
        if heads % both:
            raise PlanError(
                f"sp_ulysses_degree x tp_degree = {both} does not divide the {heads} attention heads of model "
                f"{model.name!r}: tp splits the heads, then Ulysses splits each rank's share; lower one of them."
            )
