"""Reading state dicts: safetensors memory-mapped to the target device, sharded indexes, safe pickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from telefuser.errors import WeightsError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


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


def _read_safetensors(path: Path, device: torch.device, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        # safe_open memory-maps the file and copies each tensor straight to `device`.
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                out[key] = _cast(f.get_tensor(key), dtype)
    except (SafetensorError, OSError) as exc:  # truncated, damaged or unreadable (out of memory is not caught)
        raise WeightsError(
            f"cannot read weight file {str(path)!r} ({exc}): it is truncated, damaged or unreadable; restore "
            "the original file (or re-download it), or fix the model's path in the recipe and recompile "
            "(telefuser-compile)."
        ) from exc
    return out


def _read_pickle(path: Path, device: torch.device, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    try:
        # weights_only refuses arbitrary objects: a checkpoint cannot run code.
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or broken files
        raise WeightsError(
            f"{str(path)!r} is not a plain tensor checkpoint TeleFuser can load safely ({exc}); "
            "convert it to .safetensors."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{str(path)!r} does not hold a flat dict of tensors; convert it to .safetensors.")
    return {k: _cast(v.to(device), dtype) for k, v in obj.items()}


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
                raise WeightsError(f"{str(path)!r} is neither .safetensors nor a .pth/.pt/.bin checkpoint.")
            clash = state.keys() & part.keys()
            if clash:
                raise WeightsError(f"tensor {sorted(clash)[0]!r} appears in two weight files (second: {str(path)!r}).")
            state.update(part)
    return state
