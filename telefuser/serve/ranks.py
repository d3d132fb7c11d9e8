"""Serving a plan of several ranks: rank 0 runs the HTTP service and leads; the other ranks follow.

Every rank loads the plan once (`telefuser.load_plan` joins the mesh). For each job rank 0 publishes the job's
values in the process group's key-value store (the rendezvous store: a follower may wait there for hours without
a collective timing out), then every rank calls `Pipeline.run` on them together. After each denoising step the
ranks agree on cancelling with one all-reduce of a flag, so a cancelled job stops on every rank at the same step
boundary. When the service stops, rank 0 publishes "stop" with its exit code and the followers end with it.
Followers ignore SIGINT / SIGTERM (the launcher sends them to every rank): they stop when rank 0 says so, after it
cancelled or (--drain) finished the running job. A rank that fails ends every rank (the launcher's rule).
"""

from __future__ import annotations

import datetime
import pickle
import signal
from typing import Callable, Optional

from .jobs import Cancelled

WAIT = datetime.timedelta(seconds=30)  # one wait on the store; a follower simply waits again


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _agreed(pipeline, on_step: Optional[Callable[[int, int], None]]):
    """Every rank's step hook: rank 0's own hook (progress, its cancel flag), then one all-reduce (MAX) of the flag."""
    import torch
    import torch.distributed as dist

    def hook(done: int, total: int) -> None:
        cancel = 0
        if on_step is not None:
            try:
                on_step(done, total)
            except Cancelled:
                cancel = 1
        flag = torch.tensor([cancel], dtype=torch.int32, device=pipeline.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()):
            raise Cancelled()
    return hook


class RankLeader:
    """Rank 0's runner: publishes each job to the followers, then runs its share of it."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.count = 0

    def _publish(self, message) -> None:
        _store().set(f"telefuser-serve/{self.count}", pickle.dumps(message))
        self.count += 1

    def __call__(self, values: dict, on_step):
        self._publish(("job", values))
        return self.pipeline.run(**values, progress=False, on_step=_agreed(self.pipeline, on_step))

    def stop(self, code: int) -> None:
        self._publish(("stop", code))


def follow(pipeline) -> int:
    """Ranks other than 0: run each job rank 0 publishes, until it says stop; returns its exit code."""
    from telefuser.errors import TeleFuserError

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    store = _store()
    count = 0
    while True:
        key = f"telefuser-serve/{count}"
        try:
            store.wait([key], WAIT)
        except Exception:  # the wait timed out (no job yet): wait again
            continue
        kind, payload = pickle.loads(store.get(key))
        count += 1
        if kind == "stop":
            return int(payload)
        try:
            pipeline.run(**payload, progress=False, on_step=_agreed(pipeline, None))
        except (Cancelled, TeleFuserError):  # rank 0 reports the job's outcome
            pass
