"""Tensor names, dtypes and shapes of a PyTorch zip checkpoint, read from its pickle alone.

Wan ships its VAE, umT5 encoder and CLIP as `.pth` files. Their `data.pkl`
member holds every tensor's name, storage dtype and shape; the tensor bytes
live in other members, which this reader never opens. Written here instead of
`torch.load(map_location="meta")` because importing torch costs 1-2 s, which
is most of a compile (the aim is < 0.3 s), and because a reader that accepts
only the handful of globals a state dict needs cannot run code from the file.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PickledTensor:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Dtype:
    name: str


# torch's legacy storage classes name their element type ("BFloat16Storage" -> bfloat16).
_STORAGE_DTYPES = {"Double": "float64", "Float": "float32", "Half": "float16", "BFloat16": "bfloat16",
                   "Long": "int64", "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8",
                   "Bool": "bool", "Untyped": "uint8"}


class _StateDict(dict):
    def __setstate__(self, state: Any) -> None:
        pass  # a state dict's `_metadata` (module versions) decides nothing here


def _tensor_v2(storage: _Dtype, _offset: int, size: tuple[int, ...], *_rest: Any) -> PickledTensor:
    return PickledTensor(storage.name, tuple(size))


def _tensor_v3(_storage: _Dtype, _offset: int, size: tuple[int, ...], _stride: Any, _grad: bool, _hooks: Any,
               dtype: _Dtype, *_rest: Any) -> PickledTensor:
    return PickledTensor(dtype.name, tuple(size))  # newer dtypes (float8) pair an untyped storage with a dtype


def _parameter(data: PickledTensor, *_rest: Any) -> PickledTensor:
    return data


_REBUILDERS = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILDERS:
            return _REBUILDERS[(module, name)]
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            kind = name.removesuffix("Storage")
            return _Dtype(_STORAGE_DTYPES.get(kind, kind.lower()))
        if module == "torch" and (name.startswith("float") or name.startswith("int") or name.startswith("uint")
                                  or name in ("bfloat16", "half", "double", "bool")):
            return _Dtype(name)
        raise pickle.UnpicklingError(f"refuses the global {module}.{name}: not part of a plain state dict")

    def persistent_load(self, pid: Any) -> _Dtype:
        # ("storage", storage type, key, location, numel): the storage's bytes stay in the archive.
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage" and isinstance(pid[1], _Dtype):
            return pid[1]
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")


def _find_state_dict(obj: Any) -> dict[str, PickledTensor] | None:
    """The dict of tensors: the top level, or a nested 'state_dict'/'model'/'module' entry."""
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, PickledTensor)}
        if tensors:
            return tensors
        for key in ("state_dict", "model", "module"):
            found = _find_state_dict(obj.get(key))
            if found:
                return found
    return None


# torch.serialization.MAGIC_NUMBER: the first of the three header pickles of a torch.save file from before
# torch 1.6 (magic, protocol, system info, then the object), the format older Practical-RIFE releases ship in
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy_index(path: Path) -> dict[str, PickledTensor]:
    with open(path, "rb") as f:
        try:
            header = [_IndexUnpickler(f).load() for _ in range(3)]
            legacy = header[0] == _LEGACY_MAGIC
            tensors = _find_state_dict(_IndexUnpickler(f).load()) if legacy else {}
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError, ValueError):
            legacy = False
    if not legacy:
        raise ValueError("not a zip archive, nor a torch.save file from before torch 1.6; re-save it with "
                         "torch.save or convert it to safetensors")
    if not tensors:
        raise ValueError("its pickle holds no state dict")
    return tensors


def read_pickle_index(path: Path) -> dict[str, PickledTensor]:
    """name -> (dtype, shape) of a torch.save file (zip, or the pre-1.6 format); ValueError says why the file
    is not one."""
    if not zipfile.is_zipfile(path):
        return _read_legacy_index(path)
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not names:
            raise ValueError("a zip archive without data.pkl: not a PyTorch checkpoint")
        with zf.open(names[0]) as f:
            try:
                obj = _IndexUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError) as exc:
                raise ValueError(f"its pickle is not a plain state dict ({exc})") from exc
    tensors = _find_state_dict(obj)
    if not tensors:
        raise ValueError(f"its pickle holds a {type(obj).__name__} without tensors, not a state dict")
    return tensors
