"""Parallel degrees of layer 2 (`layer2.parallel_config`) and the mesh's dimension order."""

from __future__ import annotations

import math
from typing import Optional

from pydantic import Field, PositiveInt, field_validator

from .base import StrictModel

# Mesh dimensions; each one's degree is the field `<dim>_degree` of ParallelConfig.
PARALLEL_DIMS = ("dp", "cfg", "sp_ulysses", "sp_ring", "pp", "tp")
# The same dimensions as the plan's mesh lays them out, outermost first: pipeline stages span the
# most distant ranks; tensor parallelism, the most communication-heavy, stays innermost (neighbouring
# ranks, same NVLink island); Ulysses inside ring, since its all-to-all is heavier than ring's P2P.
MESH_ORDER = ("pp", "dp", "cfg", "sp_ring", "sp_ulysses", "tp")


class ParallelConfig(StrictModel):
    device_ids: Optional[list[int]] = Field(None, description="Devices to use; default 0..num_devices-1.")
    dp_degree: PositiveInt = Field(1, description="Data parallel: prompts of a batch split across groups.")
    cfg_degree: PositiveInt = Field(1, le=2, description="CFG parallel: positive and negative branch on 2 ranks.")
    sp_ulysses_degree: PositiveInt = Field(1, description="Ulysses sequence parallel (all-to-all over heads).")
    sp_ring_degree: PositiveInt = Field(1, description="Ring attention sequence parallel.")
    pp_degree: PositiveInt = Field(1, description="Pipeline parallel (not executed yet).")
    tp_degree: PositiveInt = Field(1, description="Tensor parallel DiT.")
    enable_fsdp: bool = Field(False, description="Shard DiT and text-encoder weights across ranks (FSDP2).")
    timeout: PositiveInt = Field(600, description="Seconds a collective may wait before the run is ended.")

    def degree(self, dim: str) -> int:
        return getattr(self, f"{dim}_degree")

    def validate(self) -> "ParallelConfig":  # type: ignore[override]
        """The reference design's check: the degrees multiply to the device count (len(device_ids), or 1
        device when device_ids is None). Returns self; raises ValueError naming the degrees otherwise.

        This instance method overrides pydantic's deprecated classmethod `BaseModel.validate(value)`, which
        pydantic itself never calls; `ParallelConfig.validate(value)` on the class keeps that meaning.
        """
        if not isinstance(self, ParallelConfig):  # called on the class with a value: pydantic's meaning
            return super(ParallelConfig, ParallelConfig).validate(self)  # type: ignore[misc]
        devices = len(self.device_ids) if self.device_ids is not None else 1
        if self.world_size != devices:
            degrees = " x ".join(f"{d}_degree={self.degree(d)}" for d in PARALLEL_DIMS)
            listed = (f"device_ids {self.device_ids} lists {devices} device(s)" if self.device_ids is not None
                      else "device_ids is None, which means 1 device")
            raise ValueError(f"ParallelConfig: the parallel degrees multiply to {self.world_size} ({degrees}), but "
                             f"{listed}; list {self.world_size} device_ids or change the degrees to multiply "
                             f"to {devices}")
        return self

    @property
    def world_size(self) -> int:
        return math.prod(self.degree(d) for d in PARALLEL_DIMS)

    @field_validator("device_ids")
    @classmethod
    def _ids_unique(cls, ids: Optional[list[int]]) -> Optional[list[int]]:
        if ids is not None and (len(set(ids)) != len(ids) or any(i < 0 for i in ids)):
            raise ValueError(f"device_ids must be distinct non-negative integers, got {ids}")
        return ids
