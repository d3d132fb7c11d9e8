"""The mesh at run time: local ranks or torchrun, process groups / DeviceMesh from the plan's mesh,
sequence sharding, collectives, rank failures, and `parallelize` functions per model family.

    mesh = telefuser.distributed.create_device_mesh_from_config(parallel_config)
"""

from __future__ import annotations

from .mesh import create_device_mesh_from_config, device_mesh_from_plan

__all__ = ["create_device_mesh_from_config", "device_mesh_from_plan"]
