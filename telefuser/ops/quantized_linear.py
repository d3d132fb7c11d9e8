"""Quantised linear layers: FP8 through torch._scaled_mm (Ada/Hopper float8 tensor cores), INT8 through
torch._int_mm (int8 tensor cores, int32 accumulation).

Weights are quantised once, symmetric, to float8_e4m3fn (per-tensor or per-output-row
scale) or int8 (per-output-row scale); activations are quantised per call (FP8:
per-tensor, or per-row when the weights are per-row, as _scaled_mm requires
matching granularity; INT8: per-row).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.int8: 127.0}
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA refuses 16 rows or fewer (cuBLASLt int8 GEMM)


def _quantise(t: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~= q * scale, symmetric; int8 rounds to nearest (a float8 cast rounds by itself)."""
    limit = QUANT_MAX[dtype]
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    scale = amax.float().clamp(min=1e-12) / limit
    scaled = t.float() / scale
    if not dtype.is_floating_point:
        scaled = scaled.round()
    return scaled.clamp(-limit, limit).to(dtype), scale


class LinearFP8(nn.Module):
    """y = (x_q * x_scale) @ (W_q * weight_scale)^T + bias. Built from a float linear (quantised here), or with
    `from_quantised` from a checkpoint's float8 weight and its scales (used as stored)."""

    def __init__(self, linear: nn.Linear, data_type: torch.dtype = torch.float8_e4m3fn, rowwise: bool = False) -> None:
        super().__init__()
        weight, scale = _quantise(linear.weight.detach(), data_type, rowwise)
        out_dtype = linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.bfloat16
        self._store(weight, scale, None if linear.bias is None else linear.bias.detach(), out_dtype, rowwise)

    def _store(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
               rowwise: bool) -> None:
        self.out_features, self.in_features = weight.shape
        self.data_type, self.rowwise, self.out_dtype = weight.dtype, rowwise, out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.reshape(1, -1) if rowwise else scale.reshape(()))
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype))

    @classmethod
    def from_quantised(cls, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                       out_dtype: torch.dtype) -> "LinearFP8":
        """A layer over weights already in float8_e4m3fn (a pre-quantised checkpoint's), used as stored:
        W = weight * scale, `scale` one value (per tensor; None: 1) or one per output channel ([out] or [out, 1])."""
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise ValueError(f"expected a 2-D float8_e4m3fn weight, got {weight.dtype} {list(weight.shape)}")
        scale = torch.ones((), device=weight.device) if scale is None else scale.float()
        rowwise = scale.numel() > 1
        if rowwise and scale.numel() != weight.shape[0]:
            raise ValueError(f"a per-channel scale needs {weight.shape[0]} values, got {list(scale.shape)}")
        layer = cls.__new__(cls)  # not __init__, which quantises a float layer
        nn.Module.__init__(layer)
        layer._store(weight, scale, bias, out_dtype, rowwise)
        return layer

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


class LinearInt8(nn.Module):
    """W8A8 linear: int8 weights with per-output-row scales, activations quantised per row at each call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % 8 or self.out_features % 8:  # torch._int_mm's shape rule on CUDA
            raise ValueError(f"int8 linear needs in and out features divisible by 8, got {self.in_features} -> "
                             f"{self.out_features}; leave this layer unquantised (skip_modules)")
        weight, scale = _quantise(linear.weight.detach(), torch.int8, rowwise=True)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        xq, x_scale = _quantise(rows, torch.int8, rowwise=True)
        if xq.shape[0] < INT_MM_MIN_ROWS:  # e.g. the time-embedding projections of a batch of 2
            xq = F.pad(xq, (0, 0, 0, INT_MM_MIN_ROWS - xq.shape[0]))
        acc = torch._int_mm(xq, self.weight.t())[: rows.shape[0]]  # weight.t(): the column-major operand cuBLASLt wants
        out = acc.float() * x_scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantised_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.reshape(-1, 1)


QUANT_TYPES = {"fp8_e4m3fn": (torch.float8_e4m3fn, False), "fp8_e4m3fn_rowwise": (torch.float8_e4m3fn, True),
               "int8": (torch.int8, True)}


def _quantised(linear: nn.Linear, dtype: torch.dtype, rowwise: bool) -> nn.Module:
    return LinearInt8(linear) if dtype == torch.int8 else LinearFP8(linear, dtype, rowwise)


def replace_linear_layers(model: nn.Module, quant_type: str, skip_modules: Sequence[str] = ()) -> int:
    """Swap every nn.Linear (except names matching a `skip_modules` glob) for its quantised form; returns how many."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unsupported quantisation {quant_type!r}; supported: {', '.join(QUANT_TYPES)}")
    dtype, rowwise = QUANT_TYPES[quant_type]
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)
               and not any(fnmatch.fnmatch(name, pattern) for pattern in skip_modules)]
    replacements = []
    for name, module in targets:  # all built before any is swapped: a refusal leaves the model untouched
        try:
            replacements.append((name, _quantised(module, dtype, rowwise)))
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
    for name, quantised in replacements:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, quantised)
    return len(replacements)


def convert_params_to_buffers(model: nn.Module) -> nn.Module:
    """Turn parameters into buffers (inference only: no autograd bookkeeping, frozen state)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, param.detach())
    return model
