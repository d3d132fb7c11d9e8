"""Atomic outputs: write to a temporary file beside the target, rename over it only on success.

A reader never sees a half-written plan or video, and a failure leaves nothing behind: an
exception (KeyboardInterrupt and SIGTERM included, see telefuser.cli.errors) unwinds through
`atomic_output`, which removes the temporary file. The temporaries alive at any moment are
listed, so that a process forced to exit without unwinding (`os._exit` after a signal it could
not act on in time) can still remove them first: `remove_live_temporaries`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_live: set[Path] = set()
_live_lock = threading.Lock()


@contextlib.contextmanager
def atomic_output(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path in the target's folder; on normal exit it replaces `target`."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    with _live_lock:
        _live.add(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        finally:
            with _live_lock:
                _live.discard(tmp)


def remove_live_temporaries() -> None:
    """Removes every temporary file of an open `atomic_output` block (before a forced exit; safe to
    call from any thread)."""
    locked = _live_lock.acquire(timeout=1.0)
    try:
        temporaries = list(_live)
    finally:
        if locked:
            _live_lock.release()
    for tmp in temporaries:
        with contextlib.suppress(OSError):
            tmp.unlink()
