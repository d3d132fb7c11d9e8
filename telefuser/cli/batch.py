"""A batch of prompts (`telefuser-run PLAN --prompts prompts.txt -o outdir/`): the file, the folder, the names."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from telefuser.errors import OutputPathError, ParameterError


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ParameterError(f"--prompts {str(path)!r}: no such file; give a text file with one prompt per line.") from exc
    except UnicodeDecodeError as exc:
        raise ParameterError(f"--prompts {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                             "save it as UTF-8 with one prompt per line.") from exc
    except OSError as exc:
        raise ParameterError(f"--prompts {str(path)!r} cannot be read ({exc.strerror}); give a readable text file "
                             "with one prompt per line.") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ParameterError(f"--prompts {str(path)!r} holds no prompt (blank lines and '#' lines are skipped); "
                             "write one prompt per line.")
    return prompts


def output_folder(path: str | Path) -> Path:
    """The folder the batch's videos go to: created if missing, refused if it is a file or not writable."""
    folder = Path(path).expanduser().absolute()
    hint = "with --prompts, -o names a folder (for example -o out/)"
    if folder.suffix.lower() == ".mp4" or folder.is_file():
        raise OutputPathError(f"output {str(path)!r} is a file; {hint}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".telefuser.", suffix=".probe"):
            pass
    except OSError as exc:
        raise OutputPathError(f"output folder {str(path)!r} cannot be written ({exc.strerror}); {hint}.") from exc
    return folder


def video_name(index: int, prompt: str) -> str:
    """`0007-a-red-fox-running.mp4`: the prompt's line order, then its first words."""
    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:40].rstrip("-") or "video"
    return f"{index:04d}-{slug}.mp4"
