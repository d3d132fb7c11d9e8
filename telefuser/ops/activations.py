"""Activations and gated projections under the names diffusers users know."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FP32SiLU(nn.Module):
    """SiLU computed in float32 (small-magnitude bf16 inputs lose precision otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x.float()).to(x.dtype)


class GELU(nn.Module):
    """Linear projection followed by GELU (exact, or the tanh approximation)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nn.Module):
    """Projection to 2 x dim_out, one half gating the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate, approximate=self.approximate)


class SwiGLU(nn.Module):
    """Projection to 2 x dim_out, one half gating the other through SiLU."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.silu(gate)


class LinearSiLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(x))


class ApproximateGELU(nn.Module):
    """x * sigmoid(1.702 x) after a projection (the sigmoid approximation of GELU)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
                "mish": nn.Mish, "relu": nn.ReLU, "fp32_silu": FP32SiLU}


def get_activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(_ACTIVATIONS)}") from None


def linear_gelu_tanh(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(linear(x)); on CUDA, for a plain nn.Linear, GELU runs in the cuBLASLt epilogue.

    The epilogue (`torch._addmm_activation`) spares a write and a read of the [tokens, out]
    activation; it applies the tanh approximation on CUDA but exact GELU elsewhere, so other
    devices, and replaced layers (FP8, LoRA wrappers) whose own forward must run, take the plain path.
    """
    if x.is_cuda and type(linear) is nn.Linear and not torch.compiler.is_compiling():
        hidden = torch._addmm_activation(linear.bias, x.flatten(0, -2), linear.weight.t(), use_gelu=True)
        return hidden.unflatten(0, x.shape[:-1])
    return F.gelu(linear(x), approximate="tanh")
