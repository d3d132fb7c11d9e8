"""Which implementation each op runs: the plan's dispatch table, consulted at call time.

Under torch.compile the native PyTorch path is always traced, so Inductor can
fuse it; in eager mode on CUDA the recorded implementation (a Triton kernel)
runs; CPU tensors take the native path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch

_table: dict[str, str] = {}


def set_dispatch(table: Mapping[str, str]) -> None:
    _table.clear()
    _table.update(table)


@contextlib.contextmanager
def use_dispatch(table: Mapping[str, str]) -> Iterator[None]:
    saved = dict(_table)
    set_dispatch(table)
    try:
        yield
    finally:
        set_dispatch(saved)


def current(op: str, default: str = "torch") -> str:
    return _table.get(op, default)


def _kernels_can_run(x: torch.Tensor) -> bool:
    # CUDA tensors; or any tensor under Triton's interpreter (TRITON_INTERPRET=1, how CI tests the kernels).
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def use_kernel(op: str, x: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel on `x` (eager mode, recorded as "triton")."""
    return current(op) == "triton" and not torch.compiler.is_compiling() and _kernels_can_run(x)
