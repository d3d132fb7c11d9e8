"""Starting a plan's ranks on this machine, as torchrun's standalone mode does, with one exit code.

`telefuser-run plan.json ...` on a plan of N ranks, when torchrun did not start it, runs N copies
of itself here. The first rank to fail stops the others (a rank blocked in a collective would
wait for its dead peer forever), and the launcher prints one line naming it. SIGINT and SIGTERM
reach every rank. Each rank runs in its own process group so that stopping it also stops whatever
it started; no process outlives the launcher.

Stdlib only: the launcher must not pay for importing torch before its ranks do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

PROG = "telefuser-run"
POLL_SECONDS = 0.05
BAD_INPUT = 2  # a rank's exit code for bad input: that rank has already printed the paragraph
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for the ranks' rendezvous (MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_local_ranks(argv: list[str], world_size: int) -> int:
    """Runs `telefuser-run *argv` as `world_size` local ranks; returns the one exit code."""
    return run_local_ranks([sys.executable, "-m", "telefuser.cli.run", *argv], world_size)


def run_local_ranks(command: list[str], world_size: int, env: dict[str, str] | None = None,
                    grace_seconds: float = 5.0) -> int:
    """Runs `command` as ranks 0..world_size-1 of one local job and returns a single exit code.

    0 when every rank exits 0. When a rank fails (non-zero exit or killed by a signal), the others
    get SIGTERM, then SIGKILL after `grace_seconds`; one line on stderr names the first rank to
    fail, and its exit code is returned (128 + signum for a signal death). SIGINT or SIGTERM sent
    to the launcher is forwarded to every rank, and 130 or 143 is returned. Only rank 0's stdout
    is shown (it alone prints the summary); every rank's stderr is, since ranks report their own
    errors.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    shared_env = {
        **os.environ, **(env or {}),
        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "TELEFUSER_LAUNCHED": "1",
    }
    received: list[int] = []
    ranks: list[subprocess.Popen] = []
    with _catching_signals(received):
        try:
            for rank in range(world_size):
                ranks.append(subprocess.Popen(
                    command,
                    env={**shared_env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    # A rank in its own session cannot read the terminal (it would be stopped by
                    # SIGTTIN), and telefuser-run reads no stdin.
                    stdin=subprocess.DEVNULL,
                    stdout=None if rank == 0 else subprocess.DEVNULL,
                    start_new_session=True,
                ))
            return _monitor(ranks, received, grace_seconds)
        finally:
            # Nothing left to stop after a normal return; after an exception, no orphan remains.
            _stop(ranks, signal.SIGTERM, grace_seconds)


def _monitor(ranks: list[subprocess.Popen], received: list[int], grace_seconds: float) -> int:
    world_size = len(ranks)
    while True:
        if received:
            signum = received[0]
            _stop(ranks, signum, grace_seconds)
            ranks_word = "the rank" if world_size == 1 else f"all {world_size} ranks"
            _say(f"interrupted by {signal.Signals(signum).name}; stopped {ranks_word}.")
            return 128 + signum
        running = False
        for rank, proc in enumerate(ranks):
            code = _poll(proc)
            if code is None:
                running = True
            elif code != 0:
                _stop(ranks, signal.SIGTERM, grace_seconds)
                _say(f"error: {_failure(rank, world_size, code)}")
                return code if code > 0 else 128 - code
        if not running:
            return 0
        time.sleep(POLL_SECONDS)


def _failure(rank: int, world_size: int, returncode: int) -> str:
    """One sentence on how a rank ended; `returncode` is Popen's (negative for a signal)."""
    if returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = "unknown signal"
        # The kernel's OOM killer is by far the most common sender of an unexpected SIGKILL.
        hint = "; out of memory?" if signum == signal.SIGKILL else ""
        what = f"was killed by signal {signum} ({name}{hint})"
    elif returncode == BAD_INPUT:
        what = f"reported bad input (exit code {BAD_INPUT}; its message is above)"
    else:
        what = f"failed (exit code {returncode})"
    stopped = "; stopped the other ranks." if world_size > 1 else "."
    return f"rank {rank} of {world_size} {what}{stopped}"


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _poll(proc: subprocess.Popen) -> int | None:
    """Popen.poll, and when it first sees the rank ended, SIGKILL to the rank's group: a
    descendant left behind would outlive the launcher. Done at once: the group's id is reserved
    while a member lives, and once free, Linux hands ids out in sequence, so it is not reused yet."""
    if proc.returncode is not None:
        return proc.returncode
    code = proc.poll()
    if code is not None:
        _signal_group(proc, signal.SIGKILL)
    return code


def _stop(ranks: list[subprocess.Popen], signum: int, grace_seconds: float) -> None:
    """Sends `signum` to every running rank's process group and waits for the ranks; SIGKILL
    after the grace. The groups get SIGKILL even when their rank exited in time, so that no
    descendant of a rank survives it."""
    alive = [proc for proc in ranks if _poll(proc) is None]
    for proc in alive:
        _signal_group(proc, signum)
    deadline = time.monotonic() + grace_seconds
    for proc in alive:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in alive:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    # start_new_session made each rank the leader of its group: the group's id is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


@contextlib.contextmanager
def _catching_signals(received: list[int]) -> Iterator[None]:
    """Records SIGINT/SIGTERM for the monitor loop instead of dying from them, so the ranks are
    stopped first; the previous handlers are back afterwards. Python lets only the main thread
    install handlers; elsewhere the signals keep their usual effect and the finally clause of
    `run_local_ranks` still stops the ranks."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, lambda caught, _frame: received.append(caught))
                for signum in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler not installed from Python; the default is the nearest we can restore.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
