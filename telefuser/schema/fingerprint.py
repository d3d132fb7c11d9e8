"""Fingerprint of a weight file: its size and a hash of its index, read without loading tensors.

safetensors: the JSON header (names, dtypes, shapes, offsets). A PyTorch zip
checkpoint (.pth/.pt/.bin): its pickle (`data.pkl`), which holds the same
facts. Anything else (tokenizer.json, ...): the whole file, which is small.

The size and index hash catch a file truncated, replaced by another model's, or
re-exported; they cannot see tensor bytes changed in place. For that the plan can
also record each file's full SHA-256 (`telefuser-compile --hash-weights`, see
`recording_sha256`), which `telefuser-run` checks before loading (`file_sha256`
streams the file in chunks, with a progress bar on large files).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import struct
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .plan import FileFingerprint

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")  # .pkl: Practical-RIFE's flownet.pkl
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the header size
HASH_CHUNK_BYTES = 8 * 2**20  # file_sha256 reads this much at a time, never the whole file
PROGRESS_MIN_BYTES = 256 * 2**20  # files larger than this get a progress bar while hashed

_RECORD_SHA256: contextvars.ContextVar[bool] = contextvars.ContextVar("telefuser_record_sha256", default=False)


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
    if not zipfile.is_zipfile(path):  # a torch.save file from before torch 1.6 (old flownet.pkl): one pickle stream
        return path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not names:
            raise ValueError(f"{path} is a zip archive without data.pkl: not a PyTorch checkpoint")
        return zf.read(names[0])


def file_sha256(path: str | Path, progress: bool = True, what: str = "sha256") -> str:
    """SHA-256 of the whole file, streamed in `HASH_CHUNK_BYTES` chunks (never read whole).

    Files over `PROGRESS_MIN_BYTES` show a tqdm bar on stderr (`what` and the file name; tqdm hides it
    when stderr is not a terminal). OSError propagates to the caller, which knows which model it is."""
    path = Path(path)
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        bar = None
        if progress and size > PROGRESS_MIN_BYTES:
            from tqdm import tqdm  # lazy: only large files pay for it

            bar = tqdm(total=size, desc=f"{what} {path.name}", unit="B", unit_scale=True, unit_divisor=1024,
                       leave=False, file=sys.stderr, disable=None)
        try:
            while True:
                n = f.readinto(buffer)
                if not n:
                    break
                digest.update(view[:n])  # hashlib releases the GIL on large updates
                if bar is not None:
                    bar.update(n)
        finally:
            if bar is not None:
                bar.close()
    return digest.hexdigest()


@contextlib.contextmanager
def recording_sha256() -> Iterator[None]:
    """Within this block, `fingerprint` (and so the compiler) also records each file's full SHA-256.

    `telefuser-compile --hash-weights` compiles inside it; the compiler asks `sha256_requested()`."""
    token = _RECORD_SHA256.set(True)
    try:
        yield
    finally:
        _RECORD_SHA256.reset(token)


def sha256_requested() -> bool:
    """True inside `recording_sha256()`."""
    return _RECORD_SHA256.get()


def fingerprint(path: str | Path, full_hash: bool | None = None) -> FileFingerprint:
    """Size and index hash of a weight file; with `full_hash` (default: `sha256_requested()`) also the
    SHA-256 of the whole file."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        index = safetensors_header_bytes(path)
    elif path.suffix in PICKLE_SUFFIXES:
        index = pickle_index_bytes(path)
    else:
        index = path.read_bytes()
    if full_hash is None:
        full_hash = sha256_requested()
    return FileFingerprint(path=str(path), size=path.stat().st_size, header_sha256=hashlib.sha256(index).hexdigest(),
                           sha256=file_sha256(path, what="hashing") if full_hash else None)
