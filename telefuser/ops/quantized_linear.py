"""FP8 linear layers through torch._scaled_mm (Ada/Hopper float8 tensor cores).

Weights are quantised once to float8_e4m3fn with a per-tensor or per-output-row
scale; activations are quantised per call (per-tensor, or per-row when the
weights are per-row, as _scaled_mm requires matching granularity).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _quantise(t: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    scale = (amax.float().clamp(min=1e-12) / FP8_MAX[dtype])
    return (t.float() / scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype), scale


class LinearFP8(nn.Module):
    def __init__(self, linear: nn.Linear, data_type: torch.dtype = torch.float8_e4m3fn, rowwise: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.data_type, self.rowwise = data_type, rowwise
        self.out_dtype = linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.bfloat16
        weight, scale = _quantise(linear.weight.detach(), data_type, rowwise)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.reshape(1, -1) if rowwise else scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(self.out_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if x.is_cuda and self.data_type == torch.float8_e4m3fn:
            from telefuser.kernels.triton.quant import quantize_fp8

            xq, x_scale = quantize_fp8(rows.contiguous(), self.rowwise)  # one pass instead of four
        else:
            xq, x_scale = _quantise(rows, self.data_type, self.rowwise)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale if self.rowwise else x_scale.reshape(()),
                               scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def dequantised_weight(self) -> torch.Tensor:
        scale = self.weight_scale.reshape(-1, 1) if self.rowwise else self.weight_scale
        return self.weight.float() * scale


QUANT_TYPES = {"fp8_e4m3fn": (torch.float8_e4m3fn, False), "fp8_e4m3fn_rowwise": (torch.float8_e4m3fn, True)}


def replace_linear_layers(model: nn.Module, quant_type: str, skip_modules: Sequence[str] = ()) -> int:
    """Swap every nn.Linear (except names matching a `skip_modules` glob) for LinearFP8; returns how many."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unsupported quantisation {quant_type!r}; supported: {', '.join(QUANT_TYPES)}")
    dtype, rowwise = QUANT_TYPES[quant_type]
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)
               and not any(fnmatch.fnmatch(name, pattern) for pattern in skip_modules)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LinearFP8(module, dtype, rowwise))
    return len(targets)


def convert_params_to_buffers(model: nn.Module) -> nn.Module:
    """Turn parameters into buffers (inference only: no autograd bookkeeping, frozen state)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, param.detach())
    return model
