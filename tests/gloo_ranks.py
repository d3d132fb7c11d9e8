"""Running a test function on N real gloo ranks (CPU processes) and failing with a child's traceback."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SPAWN_DEADLINE_S = 120  # every rank also gives up on a collective after 60 s (init_process_group timeout)


def _entry(rank: int, world_size: int, port: int, worker: Callable[[], None]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        worker()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[[], None], world_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `worker` (a module-level function) on world_size gloo ranks; a child's exception fails the test."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the children before they import torch
    context = mp.spawn(_entry, args=(world_size, free_port(), worker), nprocs=world_size, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=1):  # raises ProcessRaisedException (and stops the others) if a child fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size}-rank run did not finish within {SPAWN_DEADLINE_S} s")
