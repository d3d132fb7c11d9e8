"""MODEL_CPU_OFFLOAD: a model's weights held in host memory, copied to the device for each use, dropped after.

Loaded once: at load time every parameter and buffer of the model (after LoRA merging and fp8 conversion) is
copied into a few host chunks and the module's tensors become views of them. On a CUDA device with the plan's
`pin_cpu_memory` the chunks are pinned (page-locked), so host-to-device copies run at the link's speed and
asynchronously. PyTorch's pinned allocator rounds every request up to a power of two; the chunks are therefore
planned as the binary decomposition of the total (in CHUNK_GRANULE units) and filled first-fit by decreasing
tensor size, which wastes at most about one granule instead of up to half of the model.

Moving in (`OffloadedWeights.fetch`): one device buffer for the whole model and one non-blocking copy per chunk.
A prefetch copies on a side stream that first waits for the current stream's queued work (the caching allocator
may hand out memory that work still reads), and records an event; `activate` makes the current stream wait for
that event before the module's tensors are pointed at their slices of the device buffer.

Moving out (`OffloadedWeights.deactivate`): the module's tensors point at their host views again and the device
buffer is dropped. Nothing is copied back: inference does not change weights, so the host copy is still exact.

Loaded on the device (`background=True`, when the plan records the model's first use as read straight to the
device at load): pinning is the slow part of loading (the driver locks pages at ~2 GB/s), so the module keeps
the device tensors it was loaded with, and a background thread pins the host chunks and copies those tensors
into them once, on a side stream. The first use copies nothing in; the device tensors are dropped when that use
ends, after waiting for the host copy if it is not complete yet (rarely: loading the other models takes longer), and
their freed blocks are handed back to the driver, so the plan's per-stage estimate holds from the next stage on
(compiler/memory.py counts the loaded copy only until then). From then on the model moves like any other.

On a CPU "device" the same path runs with a second CPU buffer as the device copy (synchronous copies, no
streams), so the swap logic is exercised without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

# PyTorch's pinned allocator by default calls cudaHostAlloc, which locks pages at ~2.4 GB/s and holds the CUDA
# driver's lock meanwhile: GPU work launched by another thread stalls for the whole time (bench/pinning.py on an
# H100 host: 11.36 GB in 4.7 s; 200 launch-bound matmul batches 0.16 s -> 7.4 s). Its documented alternative,
# malloc + pages touched by several threads + cudaHostRegister, pins at 7.8 GB/s and barely stalls other work.
PINNED_ALLOCATOR = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
ALIGN = 512  # bytes: every tensor starts at a multiple (covers any dtype's alignment and the copy engines')
# Host chunks are this size times a power of two (the pinned allocator's rounding, above). 32 MiB bounds the waste
# at one granule per model (1% of Wan2.1-1.3B's 2.8 GB DiT, 0.1% of a 14B DiT) and keeps the chunks few (the
# binary decomposition of the total: at most log2(total / granule) + 1, 10 for a 28 GB model); it is also the
# staging size of the GPU reader (runtime/load/weights.py: 16 x 32 MiB was the fastest, docs/benchmarks.md).
CHUNK_GRANULE = 32 << 20


def use_registered_pinning() -> None:
    """Switch PyTorch's pinned host allocator to cudaHostRegister with 8 threads (PINNED_ALLOCATOR), unless
    PYTORCH_CUDA_ALLOC_CONF already chooses how pinned memory is made."""
    if "pinned_use_cuda_host_register" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        with warnings.catch_warnings():  # PyTorch 2.11 deprecates the name for a private one; both do the same
            warnings.simplefilter("ignore", FutureWarning)
            torch.cuda.memory._set_allocator_settings(PINNED_ALLOCATOR)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class _Slot:
    """One distinct tensor of the module: where it lives in the host chunks, and who holds it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    params: list[torch.nn.Parameter] = field(default_factory=list)
    buffers: list[tuple[torch.nn.Module, str]] = field(default_factory=list)
    chunk: int = -1
    offset: int = 0
    host: Optional[torch.Tensor] = None


def plan_chunks(sizes: list[int], granule: int = CHUNK_GRANULE) -> tuple[list[int], list[tuple[int, int]]]:
    """(capacity of each chunk, (chunk, byte offset) of each size). Capacities are granule x 2^k: the binary
    decomposition of the aligned total rounded up to a granule, largest first; sizes go first-fit by decreasing
    size; one that fits nowhere opens a chunk of its own power of two. Chunks left empty are dropped."""
    padded = [_aligned(n) for n in sizes]
    units = -(-sum(padded) // granule)
    capacities = [granule << k for k in reversed(range(units.bit_length())) if units >> k & 1]
    used = [0] * len(capacities)
    where: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -padded[i]):
        need = padded[index]
        chunk = next((c for c in range(len(capacities)) if used[c] + need <= capacities[c]), None)
        if chunk is None:
            capacities.append(_pow2_at_least(max(need, granule)))
            used.append(0)
            chunk = len(capacities) - 1
        where[index] = (chunk, used[chunk])
        used[chunk] += need
    keep = [c for c in range(len(capacities)) if used[c]]
    renumber = {c: i for i, c in enumerate(keep)}
    return [capacities[c] for c in keep], [(renumber[c], offset) for c, offset in where]


def _typed(raw: torch.Tensor, start: int, slot: _Slot) -> torch.Tensor:
    """The slot's tensor as a view of a uint8 buffer at byte `start`."""
    return raw.narrow(0, start, slot.nbytes).view(slot.dtype).view(slot.shape)


class OffloadedWeights:
    """A module's parameters and buffers kept in host chunks and, while active, in one device buffer."""

    def __init__(self, module: torch.nn.Module, device: torch.device, pin: bool = True, background: bool = False) -> None:
        self.device = torch.device(device)
        self.slots = self._collect(module)
        capacities, where = plan_chunks([s.nbytes for s in self.slots])
        for slot, (chunk, offset) in zip(self.slots, where):
            slot.chunk, slot.offset = chunk, offset
        used = [0] * len(capacities)
        for slot in self.slots:
            used[slot.chunk] = max(used[slot.chunk], slot.offset + _aligned(slot.nbytes))
        self.pinned = pin and self.device.type == "cuda" and torch.cuda.is_available()
        self.chunks: list[torch.Tensor] = []
        self.chunk_capacity = capacities
        # Where each chunk goes in the device buffer (chunks back to back).
        self.device_offsets, total = [], 0
        for n in used:
            self.device_offsets.append(total)
            total += n
        self.nbytes = total
        self.device_buffer: Optional[torch.Tensor] = None
        self.ready: Optional[torch.cuda.Event] = None
        self.active = False
        self.copies_in = 0  # whole-model copies to the device (for tests and benches)
        self.bytes_in = 0
        self.loaded_on_device = background  # the module still holds the device tensors it was loaded with
        self._used_since_load = False  # ... which are kept at least until the use they were loaded for
        self._packer: Optional[threading.Thread] = None
        self._failure: Optional[BaseException] = None
        if not background:
            self._pack(used, None, point=True)
            return
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if side is not None:  # the loaded tensors are complete on the current stream before the side stream reads
            side.wait_stream(torch.cuda.current_stream(self.device))
        self._packer = threading.Thread(target=self._pack_in_background, args=(used, side), daemon=True,
                                        name="telefuser-pin")
        self._packer.start()

    def _pack(self, used: list[int], stream: Optional[torch.cuda.Stream], point: bool) -> None:
        """Allocate the host chunks and copy every tensor into its slot; with `point`, swap the module to each host
        view as it goes (a source in host memory is then freed as it goes)."""
        if self.pinned:
            use_registered_pinning()
        self.chunks = [torch.empty(n, dtype=torch.uint8, pin_memory=self.pinned) for n in used]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for slot in self.slots:
                slot.host = _typed(self.chunks[slot.chunk], slot.offset, slot)
                source = slot.params[0].data if slot.params else slot.buffers[0][0]._buffers[slot.buffers[0][1]]
                slot.host.copy_(source, non_blocking=stream is not None and self.pinned)
                if point:
                    self._point(slot, slot.host)
        if stream is not None:
            stream.synchronize()

    def _pack_in_background(self, used: list[int], stream: Optional[torch.cuda.Stream]) -> None:
        try:
            self._pack(used, stream, point=False)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread by _wait_packed)
            self._failure = exc

    def _wait_packed(self) -> None:
        if self._packer is not None:
            self._packer.join()
            self._packer = None
        if self._failure is not None:
            raise self._failure

    def release_loaded(self) -> None:
        """Drop the device tensors the model was loaded with, once it has been used and is not in use, waiting for the
        background host copy if it is still running (a failed copy is raised here)."""
        if not self.loaded_on_device or self.active or not self._used_since_load:
            return
        self._wait_packed()
        self.point_at_host()
        self.loaded_on_device = False
        if self.device.type == "cuda":
            # the loaded tensors were allocated one by one: their cached blocks fit nothing the runtime allocates
            # later (whole-model buffers, activations), so they go back to the driver instead of staying reserved
            torch.cuda.empty_cache()

    @staticmethod
    def _collect(module: torch.nn.Module) -> list[_Slot]:
        by_id: dict[int, _Slot] = {}
        for owner in module.modules():
            for name, param in owner._parameters.items():
                if param is None:
                    continue
                slot = by_id.get(id(param))
                if slot is None:
                    slot = by_id[id(param)] = _Slot(param.dtype, tuple(param.shape), param.numel() * param.element_size())
                if not any(p is param for p in slot.params):
                    slot.params.append(param)
            for name, buffer in owner._buffers.items():
                if buffer is None:
                    continue
                slot = by_id.get(id(buffer))
                if slot is None:
                    slot = by_id[id(buffer)] = _Slot(buffer.dtype, tuple(buffer.shape),
                                                     buffer.numel() * buffer.element_size())
                slot.buffers.append((owner, name))
        for slot in by_id.values():
            if slot.params and slot.buffers:
                raise ValueError("a tensor registered both as a parameter and as a buffer cannot be offloaded")
        return list(by_id.values())

    @staticmethod
    def _point(slot: _Slot, tensor: torch.Tensor) -> None:
        for param in slot.params:
            param.data = tensor
        for owner, name in slot.buffers:
            owner._buffers[name] = tensor

    def fetch(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Start copying the model into a new device buffer (no-op if one is there). With `stream` (CUDA), the
        copies run on it after the current stream's queued work and `activate` waits for them."""
        if self.device_buffer is not None or self.loaded_on_device:
            return
        buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)  # on the current stream
        side = stream is not None and self.device.type == "cuda"
        if side:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            buffer.record_stream(stream)  # not reused before the side stream's copies end, even if never activated
            context = torch.cuda.stream(stream)
        else:
            context = contextlib.nullcontext()
        with context:
            self.copy_into(buffer)
            if side:
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
        self.device_buffer = buffer
        self.copies_in += 1
        self.bytes_in += self.nbytes

    def copy_into(self, buffer: torch.Tensor) -> None:
        """Copy the host chunks into a uint8 `buffer` of at least `nbytes` on the device, on the current stream
        (asynchronously from pinned memory)."""
        for chunk, start in zip(self.chunks, self.device_offsets):
            buffer.narrow(0, start, chunk.numel()).copy_(chunk, non_blocking=self.pinned)

    def point_at(self, buffer: torch.Tensor) -> None:
        """The module's tensors become their slices of `buffer` (laid out as `copy_into` fills it)."""
        start = dict(enumerate(self.device_offsets))
        for slot in self.slots:
            self._point(slot, _typed(buffer, start[slot.chunk] + slot.offset, slot))

    def point_at_host(self) -> None:
        """The module's tensors become their host views again."""
        for slot in self.slots:
            self._point(slot, slot.host)

    def activate(self) -> None:
        """The module's tensors on the device, ready for the current stream."""
        if self.active:
            return
        if self.loaded_on_device:  # still on the tensors it was loaded with: nothing to copy
            self.active = self._used_since_load = True
            return
        self.fetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        self.point_at(self.device_buffer)
        self.active = True

    def deactivate(self) -> None:
        """The module's tensors back on their host copies; the device buffer is dropped, nothing copied back. A model
        still on the tensors it was loaded with drops them once its host copy is complete (`release_loaded`)."""
        if self.loaded_on_device:
            self.active = False
            self.release_loaded()
            return
        self.point_at_host()
        had_buffer = self.device_buffer is not None
        self.device_buffer = None
        self.ready = None
        self.active = False
        if had_buffer and self.device.type == "cuda":
            # The freed whole-model buffer would stay reserved by the caching allocator, and the next model's buffer
            # (another size) could not reuse it: reserved memory would grow to the sum of the models (measured: 38.0
            # GiB reserved for 29.2 GiB allocated, bench/memory.py). Handing it back costs a device synchronisation
            # and a cudaFree, once per model use.
            torch.cuda.empty_cache()


class PrefetchSchedule:
    """The plan's prefetch decisions (`plan.memory.prefetch`) at run time: when the decision's `during_model`
    becomes active in its `during_stage`, the decision's model starts copying in on a side stream. The pipeline
    names the stage that runs (`enter_stage`); placements report their activation (`used`)."""

    def __init__(self, decisions, placements: dict, device: torch.device) -> None:
        self.triggers: dict[tuple[str, str], list[tuple[str, str]]] = {}  # -> [(model, the stage that uses it)]
        for d in decisions:
            if d.prefetch and d.during_stage is not None and d.during_model is not None:
                self.triggers.setdefault((d.during_stage, d.during_model), []).append((d.model, d.stage))
        self.placements = placements
        self.device = torch.device(device)
        self.stage: Optional[str] = None
        self._stream: Optional[torch.cuda.Stream] = None
        self.started: list[tuple[str, str]] = []  # (stage, model) of each prefetch started (tests, benches)
        self.pending: dict[str, list] = {}  # model prefetched, not used yet -> [its stage, whether it began]

    def enter_stage(self, name: str) -> None:
        """A stage begins. A prefetched model its stage did not use (a MoE phase without steps) is dropped when the
        stage after that one begins, so its device copy does not outlive the video."""
        for model, state in list(self.pending.items()):
            if state[1]:
                del self.pending[model]
                self.placements[model].release()
            elif state[0] == name:
                state[1] = True
        self.stage = name

    @property
    def stream(self) -> Optional[torch.cuda.Stream]:
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def used(self, model: str) -> None:
        """`model` became active in the current stage: start the prefetches the plan records for that."""
        self.pending.pop(model, None)
        for name, stage in self.triggers.get((self.stage, model), ()):
            placement = self.placements.get(name)
            if placement is None or placement.weights is None:  # not on this rank, or not offloaded here
                continue
            if placement.prefetch(self.stream):
                self.started.append((self.stage, name))
                self.pending[name] = [stage, stage == self.stage]


def prefetch_failed(name: str, exc: BaseException) -> None:
    warnings.warn(f"prefetching model {name!r} ran out of device memory ({str(exc).splitlines()[0]}); it is copied "
                  "in when its stage starts instead. The plan's memory estimate was too low for this run.",
                  RuntimeWarning, stacklevel=3)
