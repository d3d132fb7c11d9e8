"""The wall time of each phase of loading a plan, recorded by the loader itself (`Pipeline.load_phases`), so that
reports and benchmarks (bench/load.py) read what the runtime measured instead of wrapping its functions."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Optional

import torch


class LoadPhases:
    """(phase, seconds) in the order they ran: "read plan", "check plan", "join ranks", "<model>: read",
    "<model>: build", "<model>: place", "warm up", ... A phase on a CUDA device ends when the current stream's work
    is done (not the whole device's: a background host copy on a side stream is not waited for)."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.rows: list[tuple[str, float]] = []
        self.device = device

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self.rows.append((name, time.perf_counter() - start))

    @property
    def total(self) -> float:
        return sum(seconds for _, seconds in self.rows)

    def as_dict(self) -> dict[str, float]:
        """Seconds by phase name (a phase run twice: summed)."""
        out: dict[str, float] = {}
        for name, seconds in self.rows:
            out[name] = out.get(name, 0.0) + seconds
        return out
