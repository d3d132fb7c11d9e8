"""GPU presets a recipe's target may name: compute capability and memory per device."""

from __future__ import annotations

GIB = 2**30

GPU_PRESETS: dict[str, tuple[str, float]] = {
    "H100": ("9.0", 80.0),
    "H200": ("9.0", 141.0),
    "A100": ("8.0", 80.0),
    "L40S": ("8.9", 48.0),
    "RTX4090": ("8.9", 24.0),
    "B200": ("10.0", 180.0),
}


def preset(name: str) -> tuple[str, float]:
    """(compute capability, memory GiB) of a preset name, case-insensitive."""
    for key, value in GPU_PRESETS.items():
        if key.lower() == name.lower():
            return value
    raise KeyError(name)
