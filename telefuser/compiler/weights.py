"""Reading weight files' indexes (names, dtypes, shapes) without loading any tensor data.

safetensors: the JSON header. Sharded checkpoints: their `*.safetensors.index.json`
or every `*.safetensors` in a folder. PyTorch zip checkpoints (Wan ships
`Wan2.1_VAE.pth`, the umT5 and the CLIP `.pth`): their pickle, read by
`pickle_index` without torch and without opening the tensor data.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from telefuser.errors import WeightsError
from telefuser.schema.fingerprint import PICKLE_SUFFIXES, safetensors_header_bytes

from .pickle_index import read_pickle_index

SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                      "I8": "int8", "U8": "uint8", "BOOL": "bool"}
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WeightIndex:
    files: list[Path]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def _safetensors_index(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        header = json.loads(safetensors_header_bytes(path))
    except (ValueError, OSError) as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc}); re-download it.") from exc
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: TensorInfo(SAFETENSORS_DTYPES.get(t["dtype"], t["dtype"].lower()), tuple(t["shape"]))
               for name, t in header.items()}
    return tensors, metadata


def _pickle_index(path: Path) -> dict[str, TensorInfo]:
    try:
        found = read_pickle_index(path)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError, RuntimeError) as exc:  # damaged archives
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}; re-download it.") from exc
    return {name: TensorInfo(t.dtype, t.shape) for name, t in found.items()}


def _weight_files(path: Path) -> list[Path]:
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            return _weight_files(indexes[0])
        shards = sorted(path.glob("*.safetensors"))
        if shards:
            return shards
        if (path / TOKENIZER_FILE).is_file():
            return [path / TOKENIZER_FILE]
        raise WeightsError(f"{path} is a folder without *.safetensors files, a shard index or a tokenizer.json.")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsError(f"{path} is not a readable shard index (needs a weight_map): {exc}.") from exc
        files = [path.parent / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"shard index {path} lists files that are missing: {', '.join(missing)}; finish the download.")
        return files
    return [path]


def read_index(path: Path) -> WeightIndex:
    """The tensors a weight path holds (a file, a shard index, or a folder)."""
    if not path.exists():
        raise WeightsError(f"weight path {path} does not exist; download the weights or fix the path "
                           "(relative paths are relative to the recipe; check ${TELEFUSER_MODEL_ROOT}).")
    files = _weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for f in files:
        if f.suffix == ".safetensors":
            found, meta = _safetensors_index(f)
            metadata.update(meta)
        elif f.suffix in PICKLE_SUFFIXES:
            found = _pickle_index(f)
        elif f.name.endswith(".json"):
            found = {}
        else:
            raise WeightsError(f"{f}: unsupported weight file type {f.suffix!r}; use .safetensors (or a PyTorch .pth; RIFE's flownet.pkl).")
        tensors.update(found)
    return WeightIndex(files=files, tensors=tensors, metadata=metadata)
