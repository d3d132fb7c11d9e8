"""Reading state dicts: safetensors straight to the target device, sharded indexes, safe pickles.

To the CPU a safetensors file is memory-mapped. To a GPU its bytes go through a few pinned staging
buffers: worker threads read consecutive runs of the file into them (`preadv`, no page faults on a
mapping) while each buffer's previous contents are copied to the device asynchronously, so reading
and the host-to-device transfer overlap and the transfer runs at pinned-memory speed. A pageable
tensor's copy (what `safe_open(device="cuda")` does per tensor) is synchronous and several times
slower. Destination tensors are allocated once, in the file's dtype, and cast on the device.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from telefuser.errors import WeightsError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")  # .pkl: Practical-RIFE's flownet.pkl


def expand_shards(path: Path) -> list[Path]:
    """A `.safetensors.index.json` names its shards (relative to itself); any other file is itself."""
    if not path.name.endswith(".index.json"):
        return [path]
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(
            f"cannot read the shard index {str(path)!r} ({exc}); it must be JSON with a 'weight_map' "
            "from tensor names to shard files, as Hugging Face writes it."
        ) from exc
    return [path.parent / shard for shard in dict.fromkeys(weight_map.values())]


def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    # Only floating weights take the compute dtype; float8 stays as stored (quantised layers read it).
    if dtype is None or not tensor.is_floating_point() or tensor.element_size() == 1:
        return tensor
    return tensor.to(dtype)


# safetensors' dtype names (the format's spec) -> torch dtypes.
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Staging: STAGE_SLOTS pinned buffers of STAGE_BYTES, each filled by its own thread. Reading from the page
# cache is the slower side, so threads help up to the cores: 11.4 GB to an H100 took 0.78 s with 4 x 64 MiB,
# 0.50 s with 8 x 64 MiB and 0.36 s with 16 x 32 MiB (bench/load.py, 16 cores; safe_open(device): 1.84 s).
STAGE_BYTES = 32 << 20
STAGE_SLOTS = max(4, min(16, os.cpu_count() or 4))

# (destination bytes on the device, source offset, byte count)
Piece = tuple[torch.Tensor, int, int]


def _staged_copy(runs: list[tuple[int, int, list[Piece]]], fill: Callable[[torch.Tensor, int], None],
                 device: torch.device) -> None:
    """Copy `runs` of source bytes to device tensors through pinned buffers, reading and transferring at once.

    A run is (source offset, byte count <= STAGE_BYTES, pieces): `fill(buffer, offset)` puts the run's bytes
    in a pinned buffer, then each piece (destination, offset in the run, count) is copied from it on the
    buffer's own stream. The caller's stream waits for every copy before this returns.
    """
    if not runs:
        return
    slots: queue.Queue = queue.Queue()
    streams = []
    for _ in range(min(STAGE_SLOTS, len(runs))):
        stream = torch.cuda.Stream(device)
        streams.append(stream)
        slots.put((torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=True), stream, None))

    def work(run: tuple[int, int, list[Piece]]) -> None:
        start, count, pieces = run
        buffer, stream, done = slots.get()
        try:
            if done is not None:
                done.synchronize()  # the buffer's previous contents are on the device
            fill(buffer[:count], start)
            with torch.cuda.stream(stream):
                for dst, offset, n in pieces:
                    dst.copy_(buffer[offset:offset + n], non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
        finally:
            slots.put((buffer, stream, done))

    with ThreadPoolExecutor(len(streams)) as pool:
        for _ in pool.map(work, runs):  # re-raises a worker's error
            pass
    current = torch.cuda.current_stream(device)
    for stream in streams:
        current.wait_stream(stream)


def _runs(pieces: list[Piece]) -> list[tuple[int, int, list[Piece]]]:
    """Pieces (destination, source offset, count) grouped into runs of consecutive source bytes of at most
    STAGE_BYTES each (large tensors split over several runs; small neighbours share one)."""
    runs: list[tuple[int, int, list[Piece]]] = []
    start = count = 0
    members: list[Piece] = []
    for dst, offset, n in sorted(pieces, key=lambda p: p[1]):
        done = 0
        while done < n:
            if not members or start + count != offset + done or count == STAGE_BYTES:
                if members:
                    runs.append((start, count, members))
                start, count, members = offset + done, 0, []
            take = min(n - done, STAGE_BYTES - count)
            members.append((dst[done:done + take], count, take))
            count += take
            done += take
    if members:
        runs.append((start, count, members))
    return runs


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _safetensors_layout(path: Path) -> tuple[dict, int]:
    """The header (name -> dtype, shape, data_offsets) and where the data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_safetensors_to_gpu(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    header, data_start = _safetensors_layout(path)
    file_size = path.stat().st_size
    out: dict[str, torch.Tensor] = {}
    pieces: list[Piece] = []
    for name, info in header.items():
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]], device=device)
        if end - begin != tensor.numel() * tensor.element_size() or data_start + end > file_size:
            raise OSError(f"tensor {name!r} does not fit its recorded byte range")
        out[name] = tensor
        if end > begin:
            pieces.append((_as_bytes(tensor), data_start + begin, end - begin))
    fd = os.open(path, os.O_RDONLY)
    try:
        def fill(buffer: torch.Tensor, offset: int) -> None:
            view = memoryview(buffer.numpy())
            got = 0
            while got < len(view):  # preadv may return less than asked
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    raise OSError(f"unexpected end of file at byte {offset + got}")
                got += n

        _staged_copy(_runs(pieces), fill, device)
    finally:
        os.close(fd)
    return out


def _read_safetensors(path: Path, device: torch.device, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        # safe_open checks the header (offsets, sizes, the file's length) before anything is read.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if device.type != "cuda":
                # Memory-mapped: a tensor's pages are read when it is first used.
                for key in f.keys():
                    out[key] = _cast(f.get_tensor(key).to(device), dtype)
        if device.type == "cuda":
            out = {k: _cast(v, dtype) for k, v in _read_safetensors_to_gpu(path, device).items()}
    except (SafetensorError, OSError, ValueError, KeyError) as exc:  # truncated, damaged or unreadable
        raise WeightsError(
            f"cannot read weight file {str(path)!r} ({exc}): it is truncated, damaged or unreadable; restore "
            "the original file (or re-download it), or fix the model's path in the recipe and recompile "
            "(telefuser-compile)."
        ) from exc
    return out


def _read_pickle(path: Path, device: torch.device, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    try:
        # weights_only refuses arbitrary objects: a checkpoint cannot run code.
        # mmap needs the zip format; a torch.save file from before torch 1.6 (old flownet.pkl) is read whole
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or broken files
        raise WeightsError(
            f"{str(path)!r} is not a plain tensor checkpoint TeleFuser can load safely ({exc}); "
            "convert it to .safetensors."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{str(path)!r} does not hold a flat dict of tensors; convert it to .safetensors.")
    if device.type == "cuda":
        obj = _tensors_to_gpu(obj, device)
    return {k: _cast(v.to(device), dtype) for k, v in obj.items()}


def _tensors_to_gpu(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """CPU tensors (memory-mapped from a checkpoint) -> equal tensors on the GPU, through the pinned buffers."""
    out: dict[str, torch.Tensor] = {}
    runs: list[tuple[int, int, list[Piece]]] = []
    sources: list[torch.Tensor] = []
    for name, src in tensors.items():
        dst = torch.empty(src.shape, dtype=src.dtype, device=device)
        out[name] = dst
        src_bytes, dst_bytes = _as_bytes(src.contiguous()), _as_bytes(dst)
        for start in range(0, src_bytes.numel(), STAGE_BYTES):
            n = min(STAGE_BYTES, src_bytes.numel() - start)
            runs.append((len(sources), n, [(dst_bytes[start:start + n], 0, n)]))
            sources.append(src_bytes[start:start + n])
    _staged_copy(runs, lambda buffer, index: buffer.copy_(sources[index]), device)
    return out


def read_state_dict(
    paths: Iterable[Path], device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None
) -> dict[str, torch.Tensor]:
    """Union of the tensors of every file (index files expanded to their shards)."""
    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    for given in paths:
        for path in expand_shards(Path(given)):
            if not path.is_file():
                raise WeightsError(
                    f"weight file {str(path)!r} is missing; restore it or fix the model's path in the recipe "
                    "and recompile (telefuser-compile)."
                )
            if path.suffix == ".safetensors":
                part = _read_safetensors(path, device, dtype)
            elif path.suffix in PICKLE_SUFFIXES:
                part = _read_pickle(path, device, dtype)
            else:
                raise WeightsError(f"{str(path)!r} is neither .safetensors nor a .pth/.pt/.bin/.pkl checkpoint.")
            clash = state.keys() & part.keys()
            if clash:
                raise WeightsError(f"tensor {sorted(clash)[0]!r} appears in two weight files (second: {str(path)!r}).")
            state.update(part)
    return state
