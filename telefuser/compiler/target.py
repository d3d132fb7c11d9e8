"""Resolving the recipe's target: device, compute capability, memory, installed packages."""

from __future__ import annotations

import importlib.util
import os

from telefuser.errors import RecipeError
from telefuser.schema.plan import ResolvedTarget
from telefuser.schema.recipe import Target
from telefuser.schema.targets import GIB, GPU_PRESETS, preset

# Optional packages that change dispatch decisions (attention backends, Triton kernels).
OPTIONAL_PACKAGES = ("triton", "flash_attn", "flash_attn_interface", "flash_attn.cute", "sageattention", "spas_sage_attn")


def _installed_here() -> list[str]:
    found = []
    for name in OPTIONAL_PACKAGES:
        try:
            if importlib.util.find_spec(name) is not None:
                found.append(name)
        except (ImportError, ValueError):
            continue
    return found


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _this_machine_cuda() -> tuple[str, str, int] | None:
    """(gpu name, capability, memory bytes) of GPU 0 here, or None. Imports torch only for `auto`."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, f"{props.major}.{props.minor}", props.total_memory


def resolve_target(target: Target) -> ResolvedTarget:
    device = target.device
    described_by = "recipe"
    gpu, cc, memory = target.gpu, target.compute_capability, None
    if device == "auto":
        described_by = "this_machine"
        here = _this_machine_cuda()
        device = "cuda" if here else "cpu"
        if here:
            gpu, cc, memory = here[0], cc or here[1], here[2]
    if gpu and device == "cuda" and described_by == "recipe":
        try:
            preset_cc, preset_gib = preset(gpu)
        except KeyError:
            raise RecipeError(f"target.gpu = {gpu!r} is not a known preset ({', '.join(GPU_PRESETS)}); "
                              "name one, or give compute_capability and memory_gib instead.") from None
        cc, memory = cc or preset_cc, int(preset_gib * GIB)
    if target.memory_gib is not None:
        memory = int(target.memory_gib * GIB)
    if device == "cpu":
        memory = memory or _host_memory()
        cc = None
    elif cc is None:
        raise RecipeError("a cuda target needs a compute capability: set target.gpu (e.g. \"H100\") or "
                          "target.compute_capability (e.g. \"9.0\"), or use target.device = \"auto\" on the GPU machine.")
    if memory is None:
        raise RecipeError("a cuda target needs its memory: set target.gpu or target.memory_gib.")
    if target.packages is not None:
        packages = sorted(target.packages)
    elif described_by == "this_machine":
        packages = _installed_here()
    else:  # a described CUDA machine: TeleFuser's own requirement, Triton, is assumed; others must be named
        packages = ["triton"] if device == "cuda" else []
    return ResolvedTarget(device=device, gpu=gpu, compute_capability=cc, memory_bytes=memory,
                          num_devices=target.num_devices, packages=packages, described_by=described_by)
