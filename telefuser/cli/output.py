"""Atomic file writes: a temp file in the target folder, then os.replace; nothing left on failure."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from telefuser.errors import TeleFuserError


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise TeleFuserError(f"cannot write {path}: the folder {folder} does not exist; create it or choose another path.")
    if path.is_dir():
        raise TeleFuserError(f"cannot write {path}: it is a directory; give a file name such as {path / 'plan.json'}.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise TeleFuserError(f"cannot write {path}: {exc.strerror}.") from exc
        raise
    return path
