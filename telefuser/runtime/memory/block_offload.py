"""SEQUENTIAL_CPU_OFFLOAD / ASYNC_CPU_OFFLOAD: a model's repeated blocks (a DiT's, a text encoder's) streamed from
host memory, group by group, as the plan records them (`plan.memory.block_offload`: the groups, the ring of device
buffers, the groups copied ahead). Which blocks a model has is its class's `BLOCK_LISTS` (`model_blocks`).

Applied from outside the model, like diffusers' group-offloading hooks: every streamed block gets a forward
pre-hook that makes its group resident before the block runs; the model code is unchanged, and the sequence-
parallel hooks (telefuser.distributed.parallelize_wan) on the same blocks only touch their inputs, so they compose.

Host side: each group is packed once by runtime/offload.py's OffloadedWeights (host chunks, pinned on CUDA with
`pin_cpu_memory`; the group's tensors become views of them). Device side: a ring of `groups_resident` buffers of
the largest group's size, allocated when the model becomes active and dropped when it stops (the caching allocator
keeps the memory for the next stage). A group is copied into a ring slot and its tensors pointed at their slices of
it; a group still in a slot is not copied again; the slot taken is the least recently used one outside the groups
wanted now. Nothing is ever copied back: inference does not change weights.

Order on CUDA, without a synchronize in the hot loop:
- sequential: the copy of a group runs on the compute stream, right after the previous group's kernels;
- async: copies run on one side stream. Entering group g records `done` for the group that ran before it (on the
  compute stream); a copy into a slot first waits for that slot's `done` (its old tensors are no longer read) and
  records `ready`; the compute stream waits for `ready` before the group runs. Entering g starts the copies of the
  next `prefetch_groups` groups (wrapping to the first group, which the next forward begins with).
The ring buffers are allocated on the compute stream and the side stream waits for it once after that; before
they are dropped the compute stream waits for the side stream, so the allocator never hands their memory out while
a copy still writes it.

On a CPU "device" the same path runs with CPU ring buffers and synchronous copies, so the slot logic is tested
without a GPU.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from telefuser.schema.enums import WeightOffloadType
from telefuser.schema.plan import BlockOffload

from .offload import OffloadedWeights


def model_blocks(module: nn.Module) -> tuple[list[nn.Module], set[str]]:
    """The module's repeated blocks in run order (block index i counts across its `BLOCK_LISTS`, the model class's
    names of its block ModuleLists: WanDiT's `blocks`, Qwen2.5-VL's `layers`, HunyuanVideo-1.5's double then single
    blocks) and those attribute names."""
    names = getattr(type(module), "BLOCK_LISTS", None)
    if not names:
        raise ValueError(f"{type(module).__name__} declares no BLOCK_LISTS (its repeated blocks); it cannot be "
                         "streamed block by block")
    blocks = [block for name in names for block in getattr(module, name)]
    return blocks, set(names)


class BlockStreamer:
    """A model's streamed blocks: host groups, the ring of device buffers while active, and the hooks."""

    def __init__(self, module: nn.Module, device: torch.device, plan: BlockOffload, pin: bool = True) -> None:
        self.device = torch.device(device)
        self.plan = plan
        blocks, lists = model_blocks(module)
        if len(blocks) != plan.num_blocks:
            raise ValueError(f"the plan streams a model of {plan.num_blocks} blocks, {type(module).__name__} has "
                             f"{len(blocks)}")
        streamed = {i for group in plan.groups for i in group}
        # The non-streamed part: the model's other submodules and its kept blocks.
        if module._parameters or module._buffers:
            raise ValueError(f"{type(module).__name__} holds tensors outside its submodules; it cannot be streamed")
        self.rest = nn.ModuleList([child for name, child in module.named_children() if name not in lists]
                                  + [b for i, b in enumerate(blocks) if i not in streamed])
        self.groups = [OffloadedWeights(nn.ModuleList([blocks[i] for i in group]), self.device, pin=pin)
                       for group in plan.groups]
        self.slot_bytes = max(g.nbytes for g in self.groups)
        self.async_copy = plan.mode == WeightOffloadType.ASYNC_CPU_OFFLOAD and self.device.type == "cuda"
        self.ring: list[torch.Tensor] = []
        self.occupant: list[Optional[int]] = []  # group held by each slot
        self.slot_of: dict[int, int] = {}
        self.stamp: list[int] = []  # when each slot's group was last entered (least recently used goes first)
        self.ready: list[torch.cuda.Event] = []  # per slot (async): its last copy is complete
        self.done: list[torch.cuda.Event] = []  # per slot (async): its group's kernels are complete
        self.current: Optional[int] = None
        self._clock = 0
        self._side: Optional[torch.cuda.Stream] = None
        self.copies_in = 0  # group copies into the ring (tests, benches)
        self.bytes_in = 0
        self.copy_streams: set[int] = set()  # streams the copies ran on (tests: the side stream was used)
        for index, group in enumerate(plan.groups):
            hook = torch._dynamo.disable(functools.partial(self._before_block, index))
            for i in group:
                blocks[i].register_forward_pre_hook(hook)

    @property
    def active(self) -> bool:
        return bool(self.ring)

    def begin(self) -> None:
        """The model becomes active: allocate the ring (on the compute stream); async, start copying the first
        groups."""
        if self.active:
            return
        count = self.plan.groups_resident
        self.ring = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(count)]
        self.occupant, self.stamp = [None] * count, [-1] * count
        self.slot_of, self.current = {}, None
        if self.async_copy:
            if self._side is None:
                self._side = torch.cuda.Stream(self.device)
            self._side.wait_stream(torch.cuda.current_stream(self.device))  # the ring's memory is free for it
            # waiting on an event never recorded waits for nothing: a slot's first copy needs no `done`
            self.ready = [torch.cuda.Event() for _ in range(count)]
            self.done = [torch.cuda.Event() for _ in range(count)]
            # the first forward begins with group 0: its copy (and the groups after it) overlaps the embeddings and
            # whatever else runs before the first streamed block
            first = list(range(min(self.plan.prefetch_groups, len(self.groups) - 1) + 1))
            for group in first:
                self._ensure(group, first)

    def end(self) -> None:
        """The model stops being active: every group back on its host views, the ring dropped."""
        if not self.active:
            return
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)  # no copy still writes a ring buffer
        for group in list(self.slot_of):
            self._to_host(group)
        self.ring, self.occupant, self.slot_of, self.current = [], [], {}, None
        self.ready, self.done = [], []

    def _before_block(self, group: int, _module: nn.Module, _args) -> None:
        if not self.active:
            raise RuntimeError("a block-offloaded model ran outside its placement's active() (its streamed blocks "
                               "are in host memory)")
        self.enter(group)

    def enter(self, group: int) -> None:
        """Make `group` resident before its first block runs, and start copying the groups after it."""
        if group == self.current:
            return
        compute = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if self.current is not None and self.async_copy:
            # the previous group's kernels are all queued on the compute stream before this point
            self.done[self.slot_of[self.current]].record(compute)
        ahead = min(self.plan.prefetch_groups, len(self.groups) - 1)
        wanted = [(group + k) % len(self.groups) for k in range(ahead + 1)]
        self._ensure(group, wanted)
        slot = self.slot_of[group]
        if self.async_copy:
            compute.wait_event(self.ready[slot])
        self.groups[group].point_at(self.ring[slot])
        self._clock += 1
        self.stamp[slot] = self._clock
        self.current = group
        for later in wanted[1:]:
            self._ensure(later, wanted)

    def _ensure(self, group: int, wanted: list[int]) -> None:
        """`group` in a ring slot: copied into the least recently used slot whose group is not wanted now."""
        if group in self.slot_of:
            return
        free = [s for s, held in enumerate(self.occupant) if held is None or held not in wanted]
        slot = min(free, key=lambda s: (self.occupant[s] is not None, self.stamp[s]))
        held = self.occupant[slot]
        if held is not None:
            self._to_host(held)
        weights, buffer = self.groups[group], self.ring[slot]
        if self.async_copy:
            side = self._side
            side.wait_event(self.done[slot])  # the slot's previous group has finished computing
            with torch.cuda.stream(side):
                weights.copy_into(buffer)
                self.ready[slot].record(side)
            self.copy_streams.add(side.cuda_stream)
        else:
            weights.copy_into(buffer)
            if self.device.type == "cuda":
                self.copy_streams.add(torch.cuda.current_stream(self.device).cuda_stream)
        self.occupant[slot], self.slot_of[group] = group, slot
        self.stamp[slot] = self._clock
        self.copies_in += 1
        self.bytes_in += weights.nbytes

    def _to_host(self, group: int) -> None:
        slot = self.slot_of.pop(group)
        self.occupant[slot] = None
        self.groups[group].point_at_host()
