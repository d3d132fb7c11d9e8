"""The parallel mesh: each rank's coordinates and, per dimension, the groups of ranks that talk."""

from __future__ import annotations

import itertools

from telefuser.schema.plan import Mesh, RankInfo
from telefuser.schema.recipe import MESH_ORDER, ParallelConfig


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
