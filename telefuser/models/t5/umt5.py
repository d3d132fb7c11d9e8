"""umT5 encoder in Wan's own parameter layout (`models_t5_umt5-xxl-enc-bf16.pth`).

T5 conventions: RMS norms without mean or bias, no 1/sqrt(d) attention
scaling, a learned relative-position bias per layer (umT5: every block has its
own table unless `shared_pos`), gated tanh-GELU feed-forward, no biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from telefuser.ops.attention import attention
from telefuser.ops.normalization import RMSNorm

MAX_DISTANCE = 128  # relative distances beyond this share the last bucket
EPS = 1e-6


@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False


UMT5_XXL = UMT5Config()


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int, max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """Bidirectional T5 buckets of `key - query`: half per direction, exact up to half of those, log-spaced after."""
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    distance = rel_pos.abs()
    max_exact = half // 2
    # clamp(min=1) only avoids log(0); those positions take the exact branch anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def position_buckets(length: int, num_buckets: int, device: torch.device) -> torch.Tensor:
    """[L, L] bucket index of every (query, key) pair; computed once per forward, shared by all blocks."""
    pos = torch.arange(length, device=device)
    return relative_position_bucket(pos[None, :] - pos[:, None], num_buckets)


class RelativePositionBias(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, N, L, L]


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)) for proj in (self.q, self.k, self.v))
        return self.o(attention(q, k, v, attn_mask=bias, scale=1.0).flatten(2))  # T5: no 1/sqrt(d)


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        # Sequential so the key reads `gate.0.weight` as in Wan's checkpoint. Not ops' linear_gelu_tanh:
        # its CUDA epilogue path needs a bias tensor and T5's projections have none.
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def attention_bias(pos: torch.Tensor, key_padding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Position bias with padded keys set to the dtype's minimum (finite, as Wan): [B, N, L, L]."""
    return torch.where(key_padding, torch.finfo(dtype).min, pos.to(dtype))


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """T5 activations overflow float16: once an inf appears, pull everything back inside the range
    (as Wan and transformers do); decided on the device, so no host sync."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top).to(x.dtype)
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, eps=EPS)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, eps=EPS)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = None if cfg.shared_pos else RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_padding: torch.Tensor,
                shared_pos: Optional[torch.Tensor]) -> torch.Tensor:
        pos = shared_pos if self.pos_embedding is None else self.pos_embedding(buckets)
        x = clamp_fp16(x + self.attn(self.norm1(x), attention_bias(pos, key_padding, x.dtype)))
        return clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    BLOCK_LISTS = ("blocks",)  # streamed by block offload (runtime/memory/block_offload.py)

    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        if config.dim_attn % config.num_heads:
            raise ValueError(f"dim_attn {config.dim_attn} is not a multiple of num_heads {config.num_heads}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embedding = RelativePositionBias(config.num_buckets, config.num_heads) if config.shared_pos else None
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, eps=EPS)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, L] -> [B, L, dim]. Padded keys (mask 0) are masked out of every attention;
        rows at padded positions are computed but meaningless (callers cut them off)."""
        x = self.token_embedding(ids)
        buckets = position_buckets(ids.shape[1], self.config.num_buckets, ids.device)
        key_padding = (mask == 0)[:, None, None, :]
        shared = self.pos_embedding(buckets) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, buckets, key_padding, shared)
        return self.norm(x)
