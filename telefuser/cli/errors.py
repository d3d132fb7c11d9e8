"""Exit codes of the CLIs: user errors as one paragraph on stderr and code 2 (never a traceback);
Ctrl-C and SIGTERM as 130 and 143, within a second or two, leaving no partial output.

Signals: `exiting_on_signals` makes SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt) in
the main thread, so that both unwind the same way: every `finally` and `atomic_output` block runs
(temporary files removed, ffmpeg killed, process groups left), then `guarded` prints one line and
returns 128 + the signal number. Python runs signal handlers only between bytecodes of the main thread;
a thread blocked for long in native code (a CUDA synchronisation, a collective waiting for a peer, a
large convolution on a busy CPU) would delay that. `forced_exit_after` covers it: a watcher thread
learns of the signal at once (through `signal.set_wakeup_fd`, written by the C-level handler), and if
the process is still inside the block `seconds` later, it kills the process's children, removes the
temporary files of open atomic writes, and ends the process with `os._exit(128 + signum)`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator

from telefuser.errors import TeleFuserError

USAGE_ERROR = 2
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
FORCED_EXIT_SECONDS = 1.5


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received by a CLI: unwinds like Ctrl-C, and exits with 128 + `signum`."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def report(prog: str, message: str) -> int:
    print(textwrap.fill(f"{prog}: error: {message}", width=100, break_long_words=False, break_on_hyphens=False),
          file=sys.stderr)
    return USAGE_ERROR


def report_interrupt(prog: str, signum: int) -> int:
    if sys.stderr.isatty():
        print(file=sys.stderr)  # below a progress bar's last state, not on its line
    print(f"{prog}: interrupted by {SIGNAL_NAMES.get(signum, signal.Signals(signum).name)}; stopped, and no "
          "partial output was left.", file=sys.stderr, flush=True)
    return 128 + signum


def guarded(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except TeleFuserError as exc:
        return report(prog, str(exc))
    except KeyboardInterrupt as exc:
        return report_interrupt(prog, getattr(exc, "signum", signal.SIGINT))


def exit_now_if_interrupted(code: int) -> int:
    """In a CLI process that was interrupted and has unwound (outputs cleaned up): flush and end it at once.

    The interpreter's own teardown with torch loaded takes 0.5-3 s on a busy CPU, which a person who
    pressed Ctrl-C (or a scheduler that sent SIGTERM and waits) should not wait for. Only for the
    command's own process (`main()` without argv); an in-process caller gets the code returned."""
    if code not in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return code
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if "logging" in sys.modules:
        import logging

        with contextlib.suppress(Exception):
            logging.shutdown()
    os._exit(code)


@contextlib.contextmanager
def exiting_on_signals() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise `Interrupted` in the main thread (elsewhere: no-op).

    Only the first signal raises; later ones are ignored while the first unwinds, so that a second
    Ctrl-C cannot break the clean-up half-way (`forced_exit_after` bounds how long that may take).
    A signal that was ignored when the block began stays ignored. The previous handlers are back
    afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[int] = []

    def handler(signum: int, _frame) -> None:
        if raised:
            return
        raised.append(signum)
        raise Interrupted(signum)

    # A signal ignored by whoever started us (SIGINT for a background job of a script) stays ignored.
    previous = {signum: signal.signal(signum, handler) for signum in INTERRUPT_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_DFL if old is None else old)


@contextlib.contextmanager
def forced_exit_after(prog: str, seconds: float = FORCED_EXIT_SECONDS) -> Iterator[None]:
    """Within the block, a SIGINT/SIGTERM that has not ended the process `seconds` later ends it:
    children killed, temporary files of open atomic writes removed, `os._exit(128 + signum)`.

    Main thread only (elsewhere: no-op). Use inside `exiting_on_signals`; leaving the block disarms it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    done = threading.Event()
    try:
        previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter, or a bad fd: go without the watcher
        reader.close()
        writer.close()
        yield
        return
    try:
        watcher = threading.Thread(target=_watch, args=(prog, reader, done, seconds),
                                   name="telefuser-signal-watcher", daemon=True)
        watcher.start()
        yield
    finally:
        try:
            signal.set_wakeup_fd(previous_fd)
        finally:
            done.set()
            writer.close()  # the watcher's recv returns b"": it closes the reader and ends


def _watch(prog: str, reader: socket.socket, done: threading.Event, seconds: float) -> None:
    with reader:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data or done.is_set():
                return
            signums = [b for b in data if b in INTERRUPT_SIGNALS]
            if signums:
                break
        if done.wait(seconds):
            return  # the main thread unwound in time
        _force_exit(prog, signums[0], seconds)


def _force_exit(prog: str, signum: int, seconds: float) -> None:
    from telefuser.atomic import remove_live_temporaries

    _kill_children()
    remove_live_temporaries()
    message = (f"{prog}: interrupted by {SIGNAL_NAMES.get(signum, str(signum))}; the run was still busy in native "
               f"code {seconds:g} s later, so the process was ended there; no partial output was left.\n")
    with contextlib.suppress(OSError):
        os.write(2, message.encode())
    os._exit(128 + signum)


def _kill_children() -> None:
    """SIGKILL to this process's children (an ffmpeg encoding into a temporary file, compile workers): they
    would outlive a forced exit. Linux: found in /proc; elsewhere nothing is done."""
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            with contextlib.suppress(OSError):
                os.kill(int(entry), signal.SIGKILL)
