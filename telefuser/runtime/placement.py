"""Where a model lives between its stages (the plan's offload mode) and peak-memory readings."""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Iterator

import torch


class Placement:
    """A model kept on the compute device, or on the CPU and moved there only for its stage."""

    def __init__(self, module: torch.nn.Module, device: torch.device, offload: bool) -> None:
        self.module = module
        self.device = device
        self.offload = offload and device.type != "cpu"

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        if self.offload:
            self.module.to(self.device)
        try:
            yield self.module
        finally:
            if self.offload:
                self.module.to("cpu")
                torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max allocated since the reset, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), f"CUDA max allocated on {device}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return (rss if sys.platform == "darwin" else rss * 1024), "process peak RSS, CPU"
