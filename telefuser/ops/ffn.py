"""FeedForward with diffusers' parameter names (net.0.proj, net.2), so its checkpoints load as is."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .activations import GEGLU, GELU, ApproximateGELU, LinearSiLU, SwiGLU

_INPUT_LAYERS = {
    "gelu": lambda i, o, b: GELU(i, o, bias=b),
    "gelu-approximate": lambda i, o, b: GELU(i, o, approximate="tanh", bias=b),
    "geglu": lambda i, o, b: GEGLU(i, o, bias=b),
    "geglu-approximate": lambda i, o, b: ApproximateGELU(i, o, bias=b),
    "swiglu": lambda i, o, b: SwiGLU(i, o, bias=b),
    "linear-silu": lambda i, o, b: LinearSiLU(i, o, bias=b),
}


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: float = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", final_dropout: bool = False, inner_dim: Optional[int] = None,
                 bias: bool = True) -> None:
        super().__init__()
        if activation_fn not in _INPUT_LAYERS:
            raise ValueError(f"unknown activation_fn {activation_fn!r}; known: {', '.join(_INPUT_LAYERS)}")
        inner = inner_dim or int(dim * mult)
        layers: list[nn.Module] = [_INPUT_LAYERS[activation_fn](dim, inner, bias), nn.Dropout(dropout),
                                   nn.Linear(inner, dim_out or dim, bias=bias)]
        if final_dropout:
            layers.append(nn.Dropout(dropout))
        self.net = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x
