"""Atomic outputs: write to a temporary file beside the target, rename over it only on success.

A reader never sees a half-written plan or video, and a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path in the target's folder; on normal exit it replaces `target`."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
