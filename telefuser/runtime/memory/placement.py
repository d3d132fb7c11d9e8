"""Where a model lives between its stages (the plan's offload mode) and peak-memory readings."""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Iterator, Optional

import torch

from telefuser.schema.plan import BlockOffload

from .block_offload import BlockStreamer
from .offload import OffloadedWeights, PrefetchSchedule, prefetch_failed


class Placement:
    """A model kept on the compute device, or (offload) in host memory and on the device only while active, or
    (block offload) with its repeated blocks (a DiT's, a text encoder's) streamed in group by group while active.

    Offloaded (`telefuser.runtime.memory.offload`): the weights are packed once into host chunks, pinned on CUDA when
    `pin`; `active()` copies them into one device buffer (or waits for a prefetch's copy) and points the module's
    tensors at it; leaving drops that buffer without copying anything back. `schedule` (the plan's prefetch
    decisions) learns of each activation, to start the next model's copy while this one runs.

    Block offload (`telefuser.runtime.memory.block_offload`, `blocks` = the plan's record for this model, `module` on the
    CPU): the streamed blocks' groups are packed into host chunks; the rest (non-block weights, kept blocks) is moved
    to the device once, or, when the plan says it is not resident between uses (Wan2.2's two experts, the base and SR
    DiTs of HunyuanVideo-1.5, a text encoder used once per video), offloaded
    like a whole model around each use. `active()` allocates the ring of group buffers; the blocks' hooks fill it.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, offload: bool, *, name: str = "",
                 pin: bool = True, schedule: Optional[PrefetchSchedule] = None, loaded_on_device: bool = False,
                 blocks: Optional[BlockOffload] = None) -> None:
        """`loaded_on_device` (offload only): `module` was loaded onto `device` for its first use, as the plan
        records; its host copy is made in the background (OffloadedWeights, background=True)."""
        self.module = module
        self.device = torch.device(device)
        self.name = name
        self.schedule = schedule
        self.weights = OffloadedWeights(module, self.device, pin=pin, background=loaded_on_device) if offload else None
        self.streamer = BlockStreamer(module, self.device, blocks, pin=pin) if blocks is not None else None
        if blocks is not None:
            if blocks.resident_between_uses:
                self.streamer.rest.to(self.device)
            else:
                self.weights = OffloadedWeights(self.streamer.rest, self.device, pin=pin)
        self._depth = 0

    @property
    def offload(self) -> bool:
        return self.weights is not None

    def prefetch(self, stream: Optional[torch.cuda.Stream] = None) -> bool:
        """Start copying an inactive offloaded model in (on `stream` when given); whether a copy started."""
        if self.weights is None or self._depth or self.weights.device_buffer is not None or self.weights.loaded_on_device:
            return False
        try:
            self.weights.fetch(stream)
        except torch.OutOfMemoryError as exc:
            prefetch_failed(self.name, exc)
            return False
        return True

    def release(self) -> None:
        """Drop a prefetched copy that was not used (nothing copied back)."""
        if self.weights is not None and not self._depth:
            self.weights.deactivate()

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        first = self._depth == 0
        if first and self.weights is not None:
            self.weights.activate()
        if first and self.streamer is not None:
            self.streamer.begin()
        self._depth += 1
        try:
            if first and self.schedule is not None:
                self.schedule.used(self.name)
            yield self.module
        finally:
            self._depth -= 1
            if self._depth == 0 and self.streamer is not None:
                self.streamer.end()
            if self._depth == 0 and self.weights is not None:
                self.weights.deactivate()


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
