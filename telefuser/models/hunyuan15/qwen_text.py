"""Qwen2.5-VL-7B-Instruct's language model as HunyuanVideo-1.5's text encoder (see `text.py` for how it is used).

A Qwen2 decoder: token embedding, pre-norm blocks of grouped-query causal self-attention (q/k/v with biases, o
without; RoPE with theta 1e6 over the full 128-wide heads in the rotate-half convention) and a SiLU-gated MLP, RMS
norms (eps 1e-6). Qwen2.5-VL's multimodal RoPE gives every text token the same position on its three axes, which
is ordinary 1-D RoPE, so text-only input needs nothing else. Published config: vocab 152064, hidden 3584, MLP 18944,
28 layers, 28 query heads and 4 key/value heads of 128.

HunyuanVideo-1.5 takes `hidden_states[-3]`: the output of layer 26 of 28, before the final norm. So only the
first `num_layers - skip_layers` layers are built and run: the last two layers, the final norm, the LM head and
the vision tower of a checkpoint are dropped on loading (about 7% of the language model's weights).

Parameter names are Hugging Face's Qwen2 language-model names without a prefix (`embed_tokens`, `layers.N.*`,
`norm`), as diffusers saves `Qwen2_5_VLTextModel`; `qwen_text_keys` maps the hub checkpoint's `model.` /
`model.language_model.` prefixes onto them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from telefuser.ops.attention import attention
from telefuser.ops.normalization import RMSNorm


@dataclass(frozen=True)
class Qwen25VLTextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28  # the checkpoint's decoder layers
    num_heads: int = 28
    num_kv_heads: int = 4
    rope_theta: float = 1000000.0
    eps: float = 1e-6
    skip_layers: int = 2  # HunyuanVideo-1.5's hidden_state_skip_layer: hidden_states[-(skip_layers + 1)]

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} heads must divide hidden {self.hidden_size} and be a multiple of "
                             f"{self.num_kv_heads} key/value heads")
        if not 0 <= self.skip_layers < self.num_layers:
            raise ValueError(f"skip_layers {self.skip_layers} must be in [0, num_layers {self.num_layers})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layers_run(self) -> int:
        return self.num_layers - self.skip_layers


def rope_cos_sin(length: int, head_dim: int, theta: float, device: torch.device | None = None):
    """(cos, sin) float32 [length, head_dim], the frequencies repeated over the two halves (rotate-half RoPE)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, N, D]: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] of the two halves; float32 math."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[None, :, None] + rotated * sin[None, :, None]).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Qwen25VLTextConfig) -> None:
        super().__init__()
        d, self.heads, self.kv_heads = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        q = _rotate_half_rope(self.q_proj(x).unflatten(-1, (self.heads, -1)), *rope)
        k = _rotate_half_rope(self.k_proj(x).unflatten(-1, (self.kv_heads, -1)), *rope)
        v = self.v_proj(x).unflatten(-1, (self.kv_heads, -1))
        groups = self.heads // self.kv_heads
        if groups > 1:  # key/value head j serves query heads j * groups ... (j + 1) * groups - 1
            k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        return self.o_proj(attention(q, k, v, attn_mask=mask).flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen25VLTextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen25VLTextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


_LAYER = re.compile(r"^layers\.(\d+)\.")


class Qwen25VLTextEncoder(nn.Module):
    BLOCK_LISTS = ("layers",)  # streamed by block offload (runtime/memory/block_offload.py)

    def __init__(self, config: Qwen25VLTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layers_run))
        if config.skip_layers == 0:
            self.norm = RMSNorm(config.hidden_size, eps=config.eps)
        self._register_load_state_dict_pre_hook(self._drop_unused)

    def _drop_unused(self, state_dict, prefix, *args) -> None:
        """A checkpoint's layers past the ones run, and its final norm when no layer is skipped, are not loaded."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            m = _LAYER.match(rest)
            if (m and int(m.group(1)) >= self.config.layers_run) or (rest == "norm.weight" and self.config.skip_layers):
                del state_dict[key]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, L] (right-padded: 1 = a token) -> hidden_states[-(skip_layers + 1)] [B, L, hidden]."""
        b, length = ids.shape
        x = self.embed_tokens(ids)
        rope = rope_cos_sin(length, self.config.head_dim, self.config.rope_theta, ids.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        attn_mask = causal[None, None] & mask.bool()[:, None, None, :]  # causal, padded keys masked
        for layer in self.layers:
            x = layer(x, rope, attn_mask)
        return self.norm(x) if self.config.skip_layers == 0 else x
