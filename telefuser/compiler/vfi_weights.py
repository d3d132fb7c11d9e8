"""The frame-interpolation and preview-decoder checkpoints, described from their pickles at compile time.

RIFE's `flownet.pkl` and TAEHV's `.pth` are torch.save files; their tensor names and shapes come from the
compiler's restricted unpickler (no tensor bytes, no torch, no code run) and their arch dicts from the model's
key description (`registry.get(...).describe`). A file that is not what the recipe says is refused here, at
compile time, with the file named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from telefuser.errors import WeightsError
from telefuser.models.registry import get as registry_entry

from .pickle_index import read_pickle_index

_WHAT = {"RIFE": ("RIFE weights", "Practical-RIFE v4.26's train_log/flownet.pkl"),
         "TAEHV": ("TAEHV weights", "madebyollin/taehv's taew2_1.pth (Wan2.1) or taew2_2.pth (Wan2.2)")}


def describe_checkpoint(class_: str, path: str | Path) -> dict[str, Any]:
    """The arch dict of a RIFE or TAEHV checkpoint; WeightsError naming the file when it is absent, unreadable,
    or not that model's."""
    what, expected = _WHAT[class_]
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {str(path)!r} do not exist; download {expected} there or fix the path.")
    try:
        index = read_pickle_index(path)
    except Exception as exc:  # noqa: BLE001 - a corrupt archive fails in many ways (zip, zlib, pickle)
        raise WeightsError(f"{what} {str(path)!r} are not a readable PyTorch checkpoint: {exc}; "
                           f"re-download {expected}.") from exc
    try:
        return registry_entry(class_).describe({k: t.shape for k, t in index.items()})
    except ValueError as exc:
        raise WeightsError(f"{what} {str(path)!r}: {exc}. Expected {expected}.") from exc


def describe_flownet(path: str | Path) -> dict[str, Any]:
    return describe_checkpoint("RIFE", path)


def describe_taehv(path: str | Path) -> dict[str, Any]:
    return describe_checkpoint("TAEHV", path)
