"""`load_plan`: file -> checked plan -> loaded Pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .load.phases import LoadPhases
from .pipeline import Pipeline
from .plan_io import check_plan_hash, plan_records_sha256, read_plan, verify_weight_hashes


def load_plan(path: str | Path, verify_weights: Optional[bool] = None) -> Pipeline:
    """Read, check and load a plan. `verify_weights` (default: when the plan records SHA-256s, i.e. was compiled
    with hash_weights) reads every weight file once and refuses one whose bytes changed."""
    phases = LoadPhases()  # the Pipeline's `load_phases`
    with phases.phase("read plan"):
        plan, raw = read_plan(path)
        check_plan_hash(plan, raw, path)
    if verify_weights is None:
        verify_weights = plan_records_sha256(plan)
    if verify_weights:
        with phases.phase("verify weights"):
            verify_weight_hashes(plan, progress=False)
    return Pipeline(plan, path, phases=phases)
