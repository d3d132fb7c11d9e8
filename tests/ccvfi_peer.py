"""ccvfi's RIFE network (the peer of tests/test_rife.py and bench/vfi.py), loaded from its installed files alone.

ccvfi's package __init__ imports its image I/O (cv2, torchvision), which the network does not need and which
a benchmark machine may not have; so `ccvfi`, `ccvfi.arch` and `ccvfi.type` are stubbed while its
`arch/arch_utils/warplayer.py`, `arch/ifnet_arch.py` and `util/misc.py` (the resize its RIFEModel.inference
applies) are loaded from the installed package, then sys.modules is restored. ccvfi 0.0.3's IFNet is RIFE v4.26
"heavy" (16 head channels); `ccvfi_version()` says which version is installed, if any.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

SUPPORTED = "0.0.3"


def ccvfi_version() -> str | None:
    try:
        return importlib.metadata.version("ccvfi")
    except importlib.metadata.PackageNotFoundError:
        return None


def load_ccvfi() -> dict[str, Any]:
    """{"IFNet": class, "resize": fn, "de_resize": fn} from the installed ccvfi (ImportError if absent)."""
    spec = importlib.util.find_spec("ccvfi")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("ccvfi is not installed (pip install ccvfi==0.0.3, the test extra)")
    root = Path(spec.submodule_search_locations[0])
    saved = {k: v for k, v in sys.modules.items() if k == "ccvfi" or k.startswith("ccvfi.")}
    stubs = {}
    for name in ("ccvfi", "ccvfi.arch", "ccvfi.arch.arch_utils", "ccvfi.type", "ccvfi.util"):
        mod = types.ModuleType(name)
        mod.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        stubs[name] = mod
    stubs["ccvfi.arch"].ARCH_REGISTRY = types.SimpleNamespace(register=lambda **_: (lambda cls: cls))
    stubs["ccvfi.type"].ArchType = types.SimpleNamespace(IFNET="IFNET")
    try:
        sys.modules.update(stubs)
        loaded = {}
        for name, rel in (("ccvfi.arch.arch_utils.warplayer", "arch/arch_utils/warplayer.py"),
                          ("ccvfi.arch.ifnet_arch", "arch/ifnet_arch.py"), ("ccvfi.util.misc", "util/misc.py")):
            file_spec = importlib.util.spec_from_file_location(name, root / rel)
            loaded[name] = importlib.util.module_from_spec(file_spec)
            sys.modules[name] = loaded[name]
            file_spec.loader.exec_module(loaded[name])
        misc = loaded["ccvfi.util.misc"]
        return {"IFNet": loaded["ccvfi.arch.ifnet_arch"].IFNet, "resize": misc.resize, "de_resize": misc.de_resize}
    finally:
        for k in [k for k in sys.modules if k == "ccvfi" or k.startswith("ccvfi.")]:
            del sys.modules[k]
        sys.modules.update(saved)
