"""Pre-quantised FP8 checkpoints loaded as stored: each float8 linear weight and its scale become a LinearFP8
(no dequantise-requantise detour); every other tensor takes the compute dtype.

Float8 tensors that are not the weight of an nn.Linear (a norm, a bias), or belong to a linear the model reads
in float32 itself (the Wan DiT's time MLP: `FLOAT32_LINEARS`) or keeps in its dtype (HunyuanVideo-1.5's
embedders and output layer: `KEEP_PRECISION_LINEARS`), are dequantised (weight * scale).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from telefuser.errors import WeightsError
from telefuser.ops.quantized_linear import LinearFP8
from telefuser.schema.fp8_keys import is_unused, scale_of, scan_fp8
from telefuser.schema.plan import PlannedModel


def _infos(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in state.items()}


def float32_linears(model: nn.Module) -> tuple[str, ...]:
    """Module-name patterns of linears the model reads as float itself (never quantised)."""
    return tuple(getattr(model, "FLOAT32_LINEARS", ()))


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    keep = (*float32_linears(model), *getattr(model, "KEEP_PRECISION_LINEARS", ()))  # read in float: dequantised
    keep_float = any(fnmatch.fnmatch(name, p) for p in keep)
    return module if isinstance(module, nn.Linear) and not keep_float else None


def place_fp8_linears(model: nn.Module, state: dict[str, torch.Tensor], planned: PlannedModel,
                      dtype: torch.dtype) -> int:
    """Swap into `model` (built on meta) a LinearFP8 for each float8 linear weight of `state` (in the model's own
    key layout), and rewrite `state` so that `load_state_dict(strict=True)` fills the rest: LinearFP8 buffers
    under their names, other float8 tensors dequantised, every other float tensor in `dtype`. Returns the count."""
    layout = scan_fp8(_infos(state))
    if layout != planned.attributes.fp8_layout:
        raise WeightsError(f"the weights of model {planned.name!r} no longer have the FP8 layout the plan recorded "
                           f"({planned.attributes.fp8_layout} -> {layout}); recompile the recipe.")
    scales = {}
    for key in list(state):
        found = scale_of(key)
        if found is not None:
            scales[found[0]] = state.pop(key).float()
        elif is_unused(key):
            del state[key]
    count = 0
    for key in [k for k, t in state.items() if t.dtype == torch.float8_e4m3fn]:
        scale = scales.get(key)
        module_name = key.removesuffix(".weight")
        linear = _linear(model, module_name) if key.endswith(".weight") and state[key].dim() == 2 else None
        if linear is None:
            weight = state[key].float()
            if scale is not None:  # per output channel: one value per row of the weight
                weight = weight * (scale.reshape(-1, *[1] * (weight.dim() - 1)) if scale.numel() > 1 else scale.reshape(()))
            state[key] = weight.to(dtype)
            continue
        bias_key = module_name + ".bias"
        layer = LinearFP8.from_quantised(state[key], scale, state.get(bias_key), dtype)
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
        state[module_name + ".weight_scale"] = layer.weight_scale
        if layer.bias is not None:
            state[bias_key] = layer.bias
        count += 1
    fp8_owned = {k for k, t in state.items() if t.dtype == torch.float8_e4m3fn}
    fp8_owned |= {k.removesuffix(".weight") + s for k in fp8_owned for s in (".weight_scale", ".bias")}
    for key, tensor in state.items():
        if key not in fp8_owned and tensor.is_floating_point():
            state[key] = tensor.to(dtype)
    return count
