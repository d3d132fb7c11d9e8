"""Which implementation each op runs: the plan's dispatch table, consulted at call time.

Under torch.compile the native PyTorch path is always traced, so Inductor can
fuse it; in eager mode on CUDA the recorded implementation (a Triton kernel)
runs; CPU tensors take the native path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch

from telefuser.schema.backends import KERNELS

# The table in force, per thread and task: a service running two plans in two threads sees each its own.
_table: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("telefuser_dispatch", default=MappingProxyType({}))
AUTO = "auto"  # no recorded choice: the kernel where it runs natively (CUDA), else native PyTorch


def set_dispatch(table: Mapping[str, str]) -> None:
    _table.set(MappingProxyType(dict(table)))


@contextlib.contextmanager
def use_dispatch(table: Mapping[str, str]) -> Iterator[None]:
    token = _table.set(MappingProxyType(dict(table)))
    try:
        yield
    finally:
        _table.reset(token)


def current(op: str, default: str = "torch") -> str:
    return _table.get().get(op, default)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _kernel_accepts(op: str, x: torch.Tensor) -> bool:
    """The kernel's declared requirements (schema/backends.py KERNELS) hold for `x`."""
    spec = KERNELS[op]
    if str(x.dtype).removeprefix("torch.") not in spec.dtypes or x.shape[-1] > spec.max_width:
        return False
    if x.is_cuda:
        return _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= spec.min_cc
    # Any device under Triton's interpreter (TRITON_INTERPRET=1, how CI tests the kernels).
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_kernel(op: str, x: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel on `x`, in eager mode only:
    - recorded as "triton" (a plan's choice): wherever the kernel accepts `x` (device, capability, dtype,
      width), Triton's interpreter on the CPU included;
    - nothing recorded (plain eager code outside a plan, "auto"): on CUDA tensors the kernel accepts;
    otherwise (recorded "torch", under torch.compile, CPU tensors outside a plan) the native path runs."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace a ContextVar read
        return False
    impl = current(op, AUTO)
    if impl not in ("triton", AUTO):
        return False
    return _kernel_accepts(op, x) and (impl == "triton" or x.is_cuda)
