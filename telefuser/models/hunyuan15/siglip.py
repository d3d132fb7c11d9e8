"""SigLIP's vision tower as HunyuanVideo-1.5's I2V image encoder (diffusers' `HunyuanVideo15ImageToVideoPipeline`
takes `SiglipVisionModel(...).last_hidden_state`; Tencent's `vision_encoder/siglip`): 729 tokens of 1152 from a
384 x 384 image, fed to the DiT's `vision_in`.

Published (so400m-patch14-384): patch 14 (27 x 27 patches, learned position embedding, no class token), hidden
1152, 27 pre-norm layers of 16 heads (72 wide) with biases, MLP 4304 with tanh-GELU, LayerNorm eps 1e-6, a final
`post_layernorm` (its output is `last_hidden_state`). The attention-pooling head is not used and not loaded.

Input: `preprocess(pixels in [-1, 1])` resizes to image_size x image_size (bicubic, antialiased: close to, not
bit-equal with, the PIL resize of SiglipImageProcessor) and is already SigLIP's normalisation ((x/255 - 0.5)/0.5
is the [-1, 1] range). Parameter names are Hugging Face's SiglipVisionTransformer's without `vision_model.`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from telefuser.ops.attention import attention
from telefuser.ops.normalization import LayerNorm


@dataclass(frozen=True)
class SigLIPVisionConfig:
    image_size: int = 384
    patch_size: int = 14
    dim: int = 1152
    mlp_dim: int = 4304
    num_heads: int = 16
    num_layers: int = 27
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class _Embeddings(nn.Module):
    def __init__(self, cfg: SigLIPVisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.dim)


class _Attention(nn.Module):
    def __init__(self, cfg: SigLIPVisionConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v).flatten(2))


class _MLP(nn.Module):
    def __init__(self, cfg: SigLIPVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _Layer(nn.Module):
    def __init__(self, cfg: SigLIPVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: SigLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))


class SigLIPVisionEncoder(nn.Module):
    def __init__(self, config: SigLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.post_layernorm = LayerNorm(config.dim, eps=config.eps, elementwise_affine=True)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 3, S, S] (S = image_size), bicubic and antialiased, clamped to [-1, 1]."""
        size = (self.config.image_size, self.config.image_size)
        if tuple(pixels.shape[-2:]) == size:
            return pixels
        out = F.interpolate(pixels.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        return out.clamp(-1.0, 1.0).to(pixels.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [B, 3, S, S] -> last_hidden_state [B, (S / patch)^2, dim]."""
        emb = self.embeddings
        x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if x.shape[1] != self.config.tokens:
            side = math.isqrt(self.config.tokens) * self.config.patch_size
            raise ValueError(f"SigLIP takes {side} x {side} images (preprocess() resizes), got {tuple(pixels.shape[-2:])}")
        x = x + emb.position_embedding.weight[None].to(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)
