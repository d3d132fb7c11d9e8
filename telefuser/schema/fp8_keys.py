"""Pre-quantised FP8 checkpoints: which tensors are float8 and where their scales are, from names, dtypes and
shapes alone. Shared by the compiler (a file's header) and the runtime (its tensors), as fingerprint.py is.

Published layouts, all `<layer>.weight` in float8_e4m3fn for the transformer blocks' linears, everything else
(embeddings, norms, biases, modulation, head) in bf16/fp32:

- ComfyUI / Kijai "scaled" fp8 (`*_fp8_e4m3fn_scaled_KJ.safetensors`, `*_fp8_scaled.safetensors`):
  `<layer>.scale_weight`, one float32 per tensor, and the marker tensor `scaled_fp8`;
- LightX2V (`*_scaled_fp8_e4m3_lightx2v*.safetensors`): `<layer>.weight_scale`, float32 [out, 1] per output
  channel; ComfyUI's newer format: `<layer>.weight_scale` per tensor beside a `<layer>.comfy_quant` descriptor;
- plain float8 weights without scales (scale 1).

Static activation scales (`scale_input`, `input_scale`) and `comfy_quant` descriptors are not used: activations
are quantised per call from their own range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .plan import Fp8Layout

FP8 = "float8_e4m3fn"
SCALE_SUFFIXES = ("scale_weight", "weight_scale")
UNUSED_SUFFIXES = ("scale_input", "input_scale", "comfy_quant")
MARKER = "scaled_fp8"

Info = tuple[str, tuple[int, ...]]  # (dtype name as torch spells it without "torch.", shape)


def is_marker(key: str) -> bool:
    return key == MARKER or key.endswith("." + MARKER)


def scale_of(key: str) -> tuple[str, str] | None:
    """`<layer>.scale_weight` -> (`<layer>.weight`, "scale_weight"); None for other keys."""
    for suffix in SCALE_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix)] + "weight", suffix
    return None


def is_unused(key: str) -> bool:
    return is_marker(key) or key.rsplit(".", 1)[-1] in UNUSED_SUFFIXES


def granularity(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str:
    """per_tensor (one value) or per_channel ([out] or [out, 1]); ValueError for anything else (block-wise)."""
    if math.prod(scale_shape) == 1:
        return "per_tensor"
    if len(weight_shape) == 2 and tuple(scale_shape) in ((weight_shape[0],), (weight_shape[0], 1)):
        return "per_channel"
    raise ValueError(f"its scale has shape {list(scale_shape)} for a weight of {list(weight_shape)}: only one scale "
                     "per tensor or per output channel is supported (not block-wise scales)")


def scan_fp8(tensors: Mapping[str, Info]) -> Fp8Layout | None:
    """The checkpoint's FP8 layout, or None when nothing in it is float8. ValueError (a sentence naming the
    tensor) for a layout that cannot be loaded: e5m2 weights, scales of non-fp8 weights, missing scales."""
    fp8 = {k: shape for k, (dtype, shape) in tensors.items() if dtype.startswith("float8") and not is_marker(k)}
    scales = {}
    for key, (_, shape) in tensors.items():
        found = scale_of(key)
        if found is not None:
            scales[key] = (*found, shape)
    marker = any(is_marker(k) for k in tensors)
    if not fp8 and not scales and not marker:
        return None
    other = sorted(k for k in fp8 if tensors[k][0] != FP8)
    if other:
        raise ValueError(f"tensor {other[0]!r} is stored as {tensors[other[0]][0]}; only float8_e4m3fn weights are "
                         "supported (convert the checkpoint to e4m3, or use its bf16 release)")
    kinds, scaled, suffixes = set(), set(), set()
    for key, (weight, suffix, shape) in sorted(scales.items()):
        if weight not in fp8:
            stored = tensors[weight][0] if weight in tensors else "absent"
            raise ValueError(f"{key!r} scales {weight!r}, which is {stored}, not a float8_e4m3fn weight: another "
                             "quantisation format (NVFP4, MXFP8, int8), or a damaged file; use an fp8 e4m3 release")
        if weight in scaled:
            raise ValueError(f"{weight!r} has both a scale_weight and a weight_scale; keep one")
        try:
            kinds.add(granularity(shape, fp8[weight]))
        except ValueError as exc:
            raise ValueError(f"{weight!r}: {exc}") from None
        scaled.add(weight)
        suffixes.add(suffix)
    if len(suffixes) > 1:
        raise ValueError("the file mixes scale_weight and weight_scale tensors; it must use one convention")
    if scales or marker:
        missing = sorted(k for k in fp8 if k not in scaled)
        if missing:
            raise ValueError(f"it is a scaled fp8 checkpoint ({'scaled_fp8 marker' if marker else 'scale tensors'}), "
                             f"but {len(missing)} float8 tensor(s) have no scale_weight/weight_scale beside "
                             f"them, e.g. {missing[0]!r}: the file is incomplete; re-download it")
        if not scaled:
            raise ValueError("it carries the scaled_fp8 marker but holds no float8 weights and no scales; "
                             "re-download it")
    kind = "unscaled" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
    linear = sum(math.prod(s) for k, s in fp8.items() if k.endswith(".weight") and len(s) == 2)
    return Fp8Layout(scale_key=suffixes.pop() if suffixes else None, granularity=kind, marker=marker,
                     fp8_tensors=len(fp8), linear_parameters=linear)
