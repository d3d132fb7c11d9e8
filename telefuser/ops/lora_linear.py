"""A LoRA applied beside a linear layer instead of merged into it: the base layer (float, FP8 or INT8) keeps its
weights as stored, and the low-rank update is two thin matmuls per call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoraLinear(nn.Module):
    """y = base(x) + (x @ down^T) @ up^T. Several LoRAs on one layer are stacked along the rank (down [sum r, in],
    up [out, sum r]) with each one's strength * alpha / rank folded into its columns of `up`."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor) -> None:
        super().__init__()
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA down {list(down.shape)} and up {list(up.shape)} do not chain")
        self.base = base
        self.register_buffer("down", down)
        self.register_buffer("up", up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + F.linear(F.linear(x.to(self.down.dtype), self.down), self.up).to(out.dtype)
