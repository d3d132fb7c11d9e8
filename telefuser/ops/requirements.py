"""The backends' and kernels' requirements (telefuser/schema/backends.py), importable without pydantic.

`telefuser.schema`'s package init imports the pydantic plan models, which GPU
hosts running a plan need not have; the requirements module itself is pure
data, so it is loaded from its file when the package init has not run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load() -> ModuleType:
    name = "telefuser.schema.backends"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "schema" / "backends.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first: dataclasses resolve their module while the file runs
    spec.loader.exec_module(module)
    return module


_backends = _load()
ATTENTION_BACKENDS = _backends.ATTENTION_BACKENDS
KERNELS = _backends.KERNELS
AttentionBackend = _backends.AttentionBackend
KernelSpec = _backends.KernelSpec
