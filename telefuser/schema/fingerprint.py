"""Fingerprint of a weight file: its size and a hash of its index, read without loading tensors.

safetensors: the JSON header (names, dtypes, shapes, offsets). A PyTorch zip
checkpoint (.pth/.pt/.bin): its pickle (`data.pkl`), which holds the same
facts. Anything else (tokenizer.json, ...): the whole file, which is small.
"""

from __future__ import annotations

import hashlib
import struct
import zipfile
from pathlib import Path

from .plan import FileFingerprint

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the header size


def safetensors_header_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path} declares a {length}-byte header: not a safetensors file")
        header = f.read(length)
    if len(header) != length:
        raise ValueError(f"{path} is truncated: its header needs {length} bytes")
    return header


def pickle_index_bytes(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not names:
            raise ValueError(f"{path} is a zip archive without data.pkl: not a PyTorch checkpoint")
        return zf.read(names[0])


def fingerprint(path: str | Path) -> FileFingerprint:
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        index = safetensors_header_bytes(path)
    elif path.suffix in PICKLE_SUFFIXES:
        index = pickle_index_bytes(path)
    else:
        index = path.read_bytes()
    return FileFingerprint(path=str(path), size=path.stat().st_size, header_sha256=hashlib.sha256(index).hexdigest())
