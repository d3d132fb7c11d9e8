"""`load_plan`: file -> checked plan -> loaded Pipeline."""

from __future__ import annotations

from pathlib import Path

from .pipeline import Pipeline
from .plan_io import check_plan_hash, read_plan


def load_plan(path: str | Path) -> Pipeline:
    plan, raw = read_plan(path)
    check_plan_hash(plan, raw, path)
    return Pipeline(plan, path)
