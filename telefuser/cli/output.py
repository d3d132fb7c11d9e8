"""Atomic file writes: a temp file in the target folder, then os.replace; nothing left on failure."""

from __future__ import annotations

from pathlib import Path

from telefuser.atomic import atomic_output
from telefuser.errors import TeleFuserError


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise TeleFuserError(f"cannot write {path}: the folder {folder} does not exist; create it or choose another path.")
    if path.is_dir():
        raise TeleFuserError(f"cannot write {path}: it is a directory; give a file name such as {path / 'plan.json'}.")
    try:
        with atomic_output(folder / path.name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise TeleFuserError(f"cannot write {path}: {exc.strerror}.") from exc
    return path
