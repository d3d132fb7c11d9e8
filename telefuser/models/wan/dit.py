"""Wan2.1 / Wan2.2 diffusion transformer, in Wan's own parameter layout.

Module and parameter names follow the official checkpoints
(`diffusion_pytorch_model*.safetensors` of Wan-AI/Wan2.1-T2V-1.3B etc.), so
those files load without renaming; diffusers' layout is converted by
`dit_keys`.

Dtypes, against the two references:
- time embedding, time projection and every modulation vector (`e`,
  `modulation + e`) are float32, as Wan computes them (diffusers runs the time
  MLP in the model dtype); the modulated norms take float32 statistics and
  return the model dtype;
- the residual stream stays in the model dtype (diffusers' choice; in Wan it
  becomes float32 after the first gated add, doubling the bytes of the largest
  activation that every norm, gate and residual reads and writes);
- every projection runs in the model dtype.

Text context: Wan cuts each prompt's umT5 embedding to its token count and
zero-pads it to text_len (512) inside its forward, before the text MLP. Here
the runtime's text stage does it (`telefuser.runtime.stages.text_encode.encode_prompts`
zeroes the rows past each prompt's length, at the plan's text_len: 512 for
Wan, fewer for the tiny test model), and the DiT takes the context as given.
In I2V the image tokens travel apart from the text, so no token count is
assumed where Wan splits them off by it.

Timesteps: `t` is [B] (one timestep per video: Wan2.1, Wan2.2 A14B) or [B, S],
one per token (Wan2.2 TI2V-5B with an image: its first latent frame's tokens
are at t = 0). Per token, the time embedding and every modulation vector are
per token too ([B, S, dim], [B, S, 6, dim]), as Wan2.2 computes them; the time
MLP runs once per distinct timestep (two per TI2V step), not once per token.
[B] keeps the per-video path ([B, 6, dim] broadcast over the tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from telefuser.ops.activations import linear_gelu_tanh
from telefuser.ops.attention import attention
from telefuser.ops.normalization import LayerNorm, RMSNorm, norm_modulate
from telefuser.ops.residual import gated_add
from telefuser.ops.rotary import apply_rotary_emb, wan_rope_cos_sin

from ..block_stack import StackBlock, plain_block

CLIP_DIM = 1280  # CLIP ViT-H/14 penultimate features fed to img_emb (Wan2.1 I2V)

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class WanDiTConfig:
    model_type: str = "t2v"  # "t2v" or "i2v" (image cross-attention + img_emb)
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int = CLIP_DIM  # i2v: width of the CLIP image features img_emb takes (read from img_emb.proj.0)

    def __post_init__(self) -> None:
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


WAN21_1_3B = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN21_14B = WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] of t * 10000^(-i/half), in float64 as Wan computes it, returned as float32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    angles = timesteps.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer` applied in float32 whatever its dtype (the tiny [B, dim] time-embedding path)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), bias)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # q/k norms span all heads (weight [dim]), as in the checkpoints.
        self.norm_q = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # [B, S, N, D], a view: stays contiguous

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over this module's tokens. The seam where `telefuser.distributed` puts sequence-parallel
        attention when the tokens are a shard of the sequence (cross-attention keeps plain attention)."""
        return attention(q, k, v)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        q = apply_rotary_emb(self._heads(self.norm_q(self.q(x))), *rope)
        k = apply_rotary_emb(self._heads(self.norm_k(self.k(x))), *rope)
        v = self._heads(self.v(x))
        return self.o(self.attend(q, k, v).flatten(2))


class WanCrossAttention(WanSelfAttention):
    """Attention of video tokens to the text context, plus (I2V) to the CLIP image tokens, summed before `o`."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, image: bool) -> None:
        super().__init__(dim, num_heads, qk_norm, eps)
        self.image = image
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        out = attention(q, self._heads(self.norm_k(self.k(context))), self._heads(self.v(context)))
        if self.image:
            if context_img is None:
                raise ValueError("an i2v Wan DiT needs clip_fea (CLIP image features)")
            k_img = self._heads(self.norm_k_img(self.k_img(context_img)))
            out = out + attention(q, k_img, self._heads(self.v_img(context_img)))
        return self.o(out.flatten(2))


class WanFeedForward(nn.Sequential):
    """Linear -> tanh-GELU -> Linear under Wan's keys ffn.0 / ffn.2 (the GELU fused into the
    up-projection on CUDA: `telefuser.ops.activations.linear_gelu_tanh`)."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _, down = self
        return down(linear_gelu_tanh(up, x))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = WanSelfAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        # norm1 / norm2 have no parameters (fused into norm_modulate); norm3 (before cross-attention) is affine.
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps, cfg.model_type == "i2v")
        self.ffn = WanFeedForward(cfg.dim, cfg.ffn_dim)
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(
        self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, rope: Rope, context_img: torch.Tensor | None = None
    ) -> torch.Tensor:
        # e: [B, 6, dim] float32, each chunk [B, 1, dim] broadcast over the tokens; or per token [B, S, 6, dim],
        # each chunk [B, S, dim] (a strided view: the kernels read the modulation through its strides).
        if e.dim() == 3:
            shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e).chunk(6, dim=1)
        else:
            shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e).unbind(2)
        x = gated_add(x, self.self_attn(norm_modulate(x, shift_sa, scale_sa, eps=self.eps), rope), gate_sa)
        x = x + self.cross_attn(self.norm3(x), context, context_img)
        return gated_add(x, self.ffn(norm_modulate(x, shift_ff, scale_ff, eps=self.eps)), gate_ff)


class WanHead(nn.Module):
    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        # t_emb: [B, dim] (per video), or [B, S, dim] per token
        if t_emb.dim() == 2:
            shift, scale = (self.modulation.float() + t_emb[:, None]).chunk(2, dim=1)
        else:
            shift, scale = (self.modulation.float() + t_emb[:, :, None]).unbind(2)
        return self.head(norm_modulate(x, shift, scale, eps=self.eps))


class WanImageEmbedding(nn.Module):
    """CLIP image features -> model width; keys img_emb.proj.{0,1,3,4}."""

    def __init__(self, clip_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(), nn.Linear(clip_dim, dim), nn.LayerNorm(dim)
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_fea)


class WanDiT(nn.Module):
    # Linears that `time_embeddings` runs in float32 through linear_fp32 (reading .weight): never quantised, and
    # dequantised when a checkpoint stores them in float8.
    FLOAT32_LINEARS = ("time_embedding.*", "time_projection.*")
    # The ModuleLists of repeated blocks, in run order: what block offload streams (runtime/memory/block_offload.py).
    BLOCK_LISTS = ("blocks",)

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=tuple(c.patch_size), stride=tuple(c.patch_size))
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList(WanBlock(c) for _ in range(c.num_layers))
        self.head = WanHead(c)
        if c.model_type == "i2v":
            self.img_emb = WanImageEmbedding(c.image_dim, c.dim)
        # The RoPE table is built on the CPU in float64 (tens of ms at 480p); once per grid and device.
        self._rope_cache: dict[tuple[tuple[int, ...], torch.device], Rope] = {}

    def residual_stack(self) -> list[StackBlock]:
        """The blocks as step caches see them: tokens in, tokens out (telefuser.models.block_stack)."""
        return [plain_block(block) for block in self.blocks]

    def attention_seams(self) -> list[nn.Module]:
        """The modules whose `attend(q, k, v)` runs the self-attention, in block order: where sequence parallelism
        and the plan's sparse attention hook in."""
        return [block.self_attn for block in self.blocks]

    def rope(self, grid: tuple[int, ...], device: torch.device) -> Rope:
        key = (grid, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = wan_rope_cos_sin(grid, self.config.head_dim, device=device)
        return self._rope_cache[key]

    def time_embeddings(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_emb [B, dim], e [B, 6, dim]) for t [B]; (t_emb [B, S, dim], e [B, S, 6, dim]) for t [B, S]. Float32
        whatever the model dtype, as Wan computes them."""
        if t.dim() == 2:  # per token: the MLP on each distinct timestep once, then gathered per token
            values, index = torch.unique(t, return_inverse=True)
            t_emb, e = self.time_embeddings(values)
            return t_emb[index], e[index]
        lin1, act, lin2 = self.time_embedding
        t_emb = linear_fp32(lin2, act(linear_fp32(lin1, sinusoidal_embedding(t, self.config.freq_dim))))
        act, proj = self.time_projection
        return t_emb, linear_fp32(proj, act(t_emb)).unflatten(1, (6, self.config.dim))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, in, F, H, W] (I2V: `y` holds the extra conditioning channels), t [B] or per token [B, S] (S = the
        tokens of x: F/pt * H/ph * W/pw, in frame, height, width order), context [B, L, text_dim]."""
        if y is not None:
            x = torch.cat([x, y], dim=1)
        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.to(dtype))
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # [B, S, dim], (frame, height, width) order
        rope = self.rope(grid, tokens.device)
        if t.dim() == 2 and tuple(t.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"per-token timesteps must be [batch, tokens] = {list(tokens.shape[:2])}, got {list(t.shape)}")
        t_emb, e = self.time_embeddings(t)

        context = self.text_embedding(context.to(dtype))
        context_img = self.img_emb(clip_fea.to(dtype)) if self.config.model_type == "i2v" and clip_fea is not None else None
        for block in self.blocks:
            tokens = block(tokens, e, context, rope, context_img)
        return self.unpatchify(self.head(tokens, t_emb), grid)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """[B, f*h*w, out*pt*ph*pw] -> [B, out, f*pt, h*ph, w*pw]."""
        (pt, ph, pw), (f, h, w) = self.config.patch_size, grid
        b, out_dim = tokens.shape[0], self.config.out_dim
        x = tokens.view(b, f, h, w, pt, ph, pw, out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, out_dim, f * pt, h * ph, w * pw)
