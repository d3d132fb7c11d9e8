"""umT5 encoder in Wan's own parameter layout (`models_t5_umt5-xxl-enc-bf16.pth`).

T5 conventions: RMS norms without mean or bias, no 1/sqrt(d) attention
scaling, a learned relative-position bias per layer (umT5: every block has its
own table unless `shared_pos`), gated tanh-GELU feed-forward, no biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from telefuser.ops.attention import attention
from telefuser.ops.normalization import RMSNorm

MAX_DISTANCE = 128  # relative distances beyond this share the last bucket


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
    """Bidirectional T5 buckets: half for each direction, exact up to half of those, log-spaced after."""
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    distance = rel_pos.abs()
    max_exact = half // 2
    # clamp(min=1) only avoids log(0); those positions take the exact branch anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.embedding.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets)
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
        return self.o(attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0).flatten(2))


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, eps=1e-6)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, eps=1e-6)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = None if cfg.shared_pos else RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, shared_bias: torch.Tensor | None) -> torch.Tensor:
        pos = shared_bias if self.pos_embedding is None else self.pos_embedding(x.shape[1])
        x = _clamp_fp16(x + self.attn(self.norm1(x), pos + mask_bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # T5 activations overflow float16; keep them finite as the reference does.
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        return x.clamp(-limit, limit)
    return x


class UMT5Encoder(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embedding = RelativePositionBias(config.num_buckets, config.num_heads) if config.shared_pos else None
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, eps=1e-6)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, L] -> [B, L, dim]; padded keys are masked out of every attention."""
        x = self.token_embedding(ids)
        # Additive bias [B, 1, 1, L]: 0 for real tokens, the float32 minimum for padding keys.
        mask_bias = torch.zeros(mask.shape, dtype=torch.float32, device=x.device)
        mask_bias = mask_bias.masked_fill(mask == 0, torch.finfo(torch.float32).min)[:, None, None, :]
        shared = self.pos_embedding(ids.shape[1]) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, mask_bias, shared)
        return self.norm(x)
