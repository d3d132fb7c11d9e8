"""CLIP ViT-H/14 image encoder in Wan's own parameter layout (the `visual.*` tensors of
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`).

That file holds a whole open-clip XLM-RoBERTa-large + ViT-H/14 CLIP; Wan2.1 image-to-video uses
only its vision tower, and only up to the penultimate block: Wan's `CLIPModel.visual` calls
`visual(x, use_31_block=True)`, i.e. patch embedding, class token, learned positions, `pre_norm`,
then 31 of the 32 pre-norm blocks, and returns those tokens ([B, 257, 1280]) without `post_norm`
or the projection `head`. They go to the DiT's `img_emb`.

Architecture (Wan's `clip_xlm_roberta_vit_h_14`): 224 px images, 14 px patches (16 x 16 + 1 class
token = 257 tokens), width 1280, 32 blocks of 16 heads, MLP 1280 -> 5120 -> 1280 with exact GELU
(`activation='gelu'`, not OpenAI CLIP's quick_gelu), LayerNorm eps 1e-5 computed in float32, a
patch convolution without bias (Wan: `bias=not pre_norm`), unmasked attention scaled by 1/sqrt(80).

Preprocessing (Wan's `CLIPModel.visual`), done inside `ClipVisionEncoder.forward`: pixels in
[-1, 1] are resized to 224 x 224 with `F.interpolate(mode='bicubic', align_corners=False)` (no
antialias, no crop: the aspect ratio is squashed, no clamp of bicubic overshoot), mapped to [0, 1]
by x * 0.5 + 0.5 and normalised with CLIP's mean/std. (diffusers' Wan I2V pipeline preprocesses with
CLIPImageProcessor instead: shortest-edge resize and centre crop; this module follows Wan.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from telefuser.ops.attention import attention
from telefuser.ops.normalization import LayerNorm

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 32
    eps: float = 1e-5
    activation: str = "gelu"  # "gelu" (exact; open-clip ViT-H/14, Wan) or "quick_gelu" (OpenAI CLIP)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # the class token first

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def num_layers_run(config: ClipVisionConfig) -> int:
    """How many blocks Wan runs: all but the last (`use_31_block`: 31 of ViT-H/14's 32). All
    `num_layers` blocks are built so the checkpoint loads strictly; the last one never runs."""
    return config.num_layers - 1


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def preprocess(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """[B, 3, H, W] pixels in [-1, 1] -> [B, 3, image_size, image_size] CLIP-normalised, float32 (as Wan)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
        raise ValueError(f"CLIP expects float pixels [B, 3, H, W] in [-1, 1], got {tuple(pixels.shape)} {pixels.dtype}")
    x = F.interpolate(pixels.float(), size=(image_size, image_size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)  # rows: q, k, v (open_clip's in_proj order)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # each [B, S, N, D]
        return self.proj(attention(q, k, v).flatten(2))


class AttentionBlock(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        # Sequential so the keys read mlp.0 / mlp.2 as in Wan's checkpoint.
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), _ACTIVATIONS[cfg.activation](),
                                 nn.Linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Wan's `visual` tower with pool type 'token' and pre_norm, without its projection `head`
    (unused by Wan's features and absent from diffusers' CLIPVisionModel)."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.transformer = nn.ModuleList(AttentionBlock(cfg) for _ in range(cfg.num_layers))
        # In every checkpoint layout, so kept for strict loading; Wan's features stop before it.
        self.post_norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor, num_blocks: Optional[int] = None) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] (S = image_size) -> tokens [B, num_tokens, dim] after the
        first `num_blocks` blocks (all by default; 0 gives pre_norm's output), before post_norm."""
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"the vision tower takes {size} x {size} images, got {tuple(x.shape[-2:])}; "
                             "ClipVisionEncoder.forward resizes them")
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.pre_norm(x)
        for block in self.transformer[:num_blocks]:
            x = block(x)
        return x


class ClipVisionEncoder(nn.Module):
    """Wan2.1 I2V's CLIP image features: forward(pixels [B, 3, H, W] in [-1, 1]) -> [B, 257, 1280]
    (ViT-H/14), the output of the penultimate block, in the model's dtype."""

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(preprocess(pixels, self.config.image_size), num_layers_run(self.config))


VIT_H_14 = ClipVisionConfig()
