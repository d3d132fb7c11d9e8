"""One loader for the models whose architecture is read off their one checkpoint file (RIFE's flownet.pkl,
TAEHV's .pth / .safetensors), for use outside a plan (tests, bench): read, describe, build, load, through the
registry entry, so each family only names itself. Inside a plan the runtime's `load.build.build_model` builds
them from the arch the compiler recorded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from telefuser.errors import WeightsError

from . import registry


def _read(path: str | Path) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # never a full unpickler
    return state if isinstance(state, dict) else {}


def load_described(name: str, path: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, redownload: str = "them") -> nn.Module:
    """The registry's model `name` with the weights of `path`, its arch from the entry's `describe` of the file's
    shapes, on `device` in `dtype`, in eval mode. A file that cannot be read or is not this model's: WeightsError
    naming it (`redownload`: what the message tells to fetch again)."""
    entry = registry.get(name)
    try:
        tensors = _read(path)
    except Exception as exc:  # noqa: BLE001 - corrupt files fail in many ways; all are bad input
        kind = "safetensors file" if str(path).endswith(".safetensors") else "PyTorch checkpoint"
        raise WeightsError(f"{name} weights {str(path)!r} are not a readable {kind}: {exc}; re-download "
                           f"{redownload}.") from exc
    try:
        arch = entry.describe({k: tuple(v.shape) for k, v in tensors.items() if isinstance(v, torch.Tensor)})
    except ValueError as exc:
        raise WeightsError(f"{name} weights {str(path)!r}: {exc}.") from exc
    model = entry.model_class(entry.config_class(**arch))
    model.load_state_dict(entry.convert(tensors, entry.detect_layout(tensors)))
    return model.to(device=device, dtype=dtype).eval()
