"""The backends' and kernels' requirements (telefuser/schema/backends.py), importable without pydantic.

`telefuser.schema`'s package init imports the pydantic plan models, which GPU
hosts running a plan need not have. The requirements module itself is pure
data, so where the package cannot be imported it is loaded from its file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "telefuser.schema.backends"


def _load() -> ModuleType:
    try:
        return importlib.import_module(_NAME)
    except ImportError:  # the package init failed (pydantic missing): nothing here can import telefuser.schema
        pass
    spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).resolve().parent.parent / "schema" / "backends.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module  # registered first: dataclasses resolve their module while the file runs
    spec.loader.exec_module(module)
    return module


_backends = _load()
ATTENTION_BACKENDS = _backends.ATTENTION_BACKENDS
KERNELS = _backends.KERNELS
