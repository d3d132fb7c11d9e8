"""HunyuanVideo-1.5 DiT layers: RoPE, time and text embedders, the token refiner, the double- and single-stream
blocks and the final layer, in Tencent's own parameter layout (assembled by `dit.HunyuanVideo15DiT`)."""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from telefuser.ops.activations import linear_gelu_tanh
from telefuser.ops.attention import attention
from telefuser.ops.normalization import LayerNorm, RMSNorm, norm_modulate
from telefuser.ops.residual import gated_add
from telefuser.ops.rotary import apply_rotary_emb

from .dit_config import HunyuanVideo15DiTConfig

Rope = tuple[torch.Tensor, torch.Tensor]


def rope_cos_sin(grid: tuple[int, int, int], rope_dims: list[int], theta: float,
                 device: torch.device | None = None) -> Rope:
    """(cos, sin), float32 [t*h*w, head_dim // 2], tokens in (t, h, w) order: the head dim's interleaved pairs are
    split per axis as `rope_dims` (channels) says, each part rotated by its coordinate with frequencies
    theta^(-2i/d_axis) (HunyuanVideo's get_nd_rotary_pos_embed with use_real)."""
    axes = []
    for n, d in zip(grid, rope_dims):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        axes.append(torch.outer(torch.arange(n, dtype=torch.float64), inv))
    t, h, w = grid
    full = torch.cat([
        axes[0][:, None, None, :].expand(t, h, w, -1),
        axes[1][None, :, None, :].expand(t, h, w, -1),
        axes[2][None, None, :, :].expand(t, h, w, -1),
    ], dim=-1).reshape(t * h * w, -1)
    return full.cos().float().to(device), full.sin().float().to(device)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] of t * max_period^(-i/half), computed in float64, returned as float32 [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def condition_latents(latents: torch.Tensor, image_latent: torch.Tensor | None = None) -> torch.Tensor:
    """The base DiT's conditioning channels for `latents` [B, C, F, h, w]: [condition latent (C), mask (1)].
    T2V (`image_latent` None): zeros. I2V: the first frame's VAE latent ([B or 1, C, 1, h, w], already scaled by the
    VAE's scaling factor) at frame 0 and zeros after it, mask 1 at frame 0 (the published _prepare_cond_latents)."""
    b, c, f, h, w = latents.shape
    y = latents.new_zeros(b, c + 1, f, h, w)
    if image_latent is not None:
        if tuple(image_latent.shape[1:]) != (c, 1, h, w):
            raise ValueError(f"image_latent must be [B, {c}, 1, {h}, {w}], got {list(image_latent.shape)}")
        y[:, :c, :1] = image_latent.to(y.dtype)
        y[:, c, 0] = 1.0
    return y


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (256) -> Linear -> SiLU -> Linear; keys mlp.0 / mlp.2."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_size).to(dtype))


class TextProjection(nn.Module):
    """Linear -> SiLU -> Linear; keys linear_1 / linear_2 (the refiner's pooled-text embedder)."""

    def __init__(self, in_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (keys fc1 / fc2)."""

    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu_tanh":
            return self.fc2(linear_gelu_tanh(self.fc1, x))
        return self.fc2(F.silu(self.fc1(x)))


class Modulation(nn.Module):
    """SiLU -> Linear to `factor` vectors of the hidden size (key linear); float32 out."""

    def __init__(self, hidden_size: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.linear = nn.Linear(hidden_size, factor * hidden_size)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.linear(F.silu(vec))
        return tuple(c[:, None, :] for c in out.float().chunk(self.factor, dim=-1))  # each [B, 1, hidden]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))


def _key_mask(mask: torch.Tensor | None, video_tokens: int) -> torch.Tensor | None:
    """[B, Lctx] bool (True = a real context token) -> an attention mask over [video tokens, context tokens] keys."""
    if mask is None:
        return None
    full = F.pad(mask, (video_tokens, 0), value=True)
    return full[:, None, None, :]  # [B, 1, 1, S]: broadcast over heads and queries


class RefinerBlock(nn.Module):
    """The token refiner's block: self-attention and a SiLU MLP on the text tokens, each gated by the pooled
    text + timestep vector (keys norm1, self_attn_qkv, self_attn_proj, norm2, mlp.fc1/fc2, adaLN_modulation.1)."""

    def __init__(self, hidden_size: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm(hidden_size, eps=1e-6, elementwise_affine=True)
        self.self_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = LayerNorm(hidden_size, eps=1e-6, elementwise_affine=True)
        self.mlp = MLP(hidden_size, mlp_hidden, "silu")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        gate_msa, gate_mlp = (g[:, None, :] for g in self.adaLN_modulation(c).float().chunk(2, dim=-1))
        q, k, v = _heads(self.self_attn_qkv(self.norm1(x)), 3 * self.heads).chunk(3, dim=2)  # (K H D) order
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = attention(q, k, v, attn_mask=attn_mask).flatten(2)
        x = gated_add(x, self.self_attn_proj(out), gate_msa)
        return gated_add(x, self.mlp(self.norm2(x)), gate_mlp)


class _RefinerStack(nn.Module):
    def __init__(self, hidden_size: int, heads: int, depth: int, mlp_hidden: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RefinerBlock(hidden_size, heads, mlp_hidden) for _ in range(depth))


class TokenRefiner(nn.Module):
    """Qwen2.5-VL hidden states -> model width, refined by self-attention conditioned on the timestep and the
    mean of the valid text states (the published SingleTokenRefiner; keys txt_in.*)."""

    def __init__(self, in_dim: int, hidden_size: int, heads: int, depth: int, mlp_hidden: int) -> None:
        super().__init__()
        self.input_embedder = nn.Linear(in_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.c_embedder = TextProjection(in_dim, hidden_size)
        self.individual_token_refiner = _RefinerStack(hidden_size, heads, depth, mlp_hidden)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, in_dim] of valid tokens (mask [B, L] bool marks them when the batch is padded)."""
        if mask is None:
            pooled = x.float().mean(dim=1)
        else:
            m = mask.float()[..., None]
            pooled = (x.float() * m).sum(dim=1) / m.sum(dim=1)
        c = self.t_embedder(t, x.dtype) + self.c_embedder(pooled.to(x.dtype))
        x = self.input_embedder(x)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, mask)
        return x


class ByT5Mapper(nn.Module):
    """byT5 glyph states -> model width: LayerNorm -> fc1 -> GELU -> fc2 -> GELU -> fc3 (keys byt5_in.*)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.layernorm = LayerNorm(in_dim, eps=1e-5, elementwise_affine=True)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(self.layernorm(x))))))


class VisionProjection(nn.Module):
    """SigLIP image states -> model width; keys vision_in.proj.{0,1,3,4}."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(LayerNorm(in_dim, eps=1e-5, elementwise_affine=True), nn.Linear(in_dim, in_dim),
                                  nn.GELU(), nn.Linear(in_dim, out_dim), LayerNorm(out_dim, eps=1e-5, elementwise_affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: list[int], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=tuple(patch_size), stride=tuple(patch_size))


class DoubleStreamBlock(nn.Module):
    """Video and context streams with their own weights, attending jointly (keys double_blocks.N.img_* / txt_*)."""

    def __init__(self, cfg: HunyuanVideo15DiTConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.eps = cfg.heads_num, cfg.eps
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(h, 6))
            setattr(self, f"{s}_attn_q", nn.Linear(h, h))
            setattr(self, f"{s}_attn_k", nn.Linear(h, h))
            setattr(self, f"{s}_attn_v", nn.Linear(h, h))
            setattr(self, f"{s}_attn_q_norm", RMSNorm(d, eps=1e-6))
            setattr(self, f"{s}_attn_k_norm", RMSNorm(d, eps=1e-6))
            setattr(self, f"{s}_attn_proj", nn.Linear(h, h))
            setattr(self, f"{s}_mlp", MLP(h, cfg.mlp_hidden_dim, "gelu_tanh"))

    def _qkv(self, s: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = getattr(self, f"{s}_attn_q_norm")(_heads(getattr(self, f"{s}_attn_q")(x), self.heads))
        k = getattr(self, f"{s}_attn_k_norm")(_heads(getattr(self, f"{s}_attn_k")(x), self.heads))
        return q, k, _heads(getattr(self, f"{s}_attn_v")(x), self.heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               video_tokens: int) -> torch.Tensor:
        """Joint attention over [video, context] tokens ([B, S, N, D], the first `video_tokens` of S the video's):
        the seam for sequence-parallel attention, which shards the video tokens and keeps the context whole."""
        return attention(q, k, v, attn_mask=mask)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rope: Rope,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self._qkv("img", norm_modulate(img, i_shift1, i_scale1, eps=self.eps))
        iq, ik = apply_rotary_emb(iq, *rope), apply_rotary_emb(ik, *rope)
        tq, tk, tv = self._qkv("txt", norm_modulate(txt, t_shift1, t_scale1, eps=self.eps))
        n = img.shape[1]
        out = self.attend(torch.cat([iq, tq], 1), torch.cat([ik, tk], 1), torch.cat([iv, tv], 1), mask, n).flatten(2)
        img = gated_add(img, self.img_attn_proj(out[:, :n]), i_gate1)
        img = gated_add(img, self.img_mlp(norm_modulate(img, i_shift2, i_scale2, eps=self.eps)), i_gate2)
        txt = gated_add(txt, self.txt_attn_proj(out[:, n:]), t_gate1)
        txt = gated_add(txt, self.txt_mlp(norm_modulate(txt, t_shift2, t_scale2, eps=self.eps)), t_gate2)
        return img, txt


class _Linear2(nn.Module):
    """The single-stream block's output projection over [attention, MLP activations] (key linear2.fc)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)


class SingleStreamBlock(nn.Module):
    """One stream over [video, context] tokens, attention and MLP in parallel (keys single_blocks.N.*)."""

    def __init__(self, cfg: HunyuanVideo15DiTConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.eps = cfg.heads_num, cfg.eps
        self.linear1_q = nn.Linear(h, h)
        self.linear1_k = nn.Linear(h, h)
        self.linear1_v = nn.Linear(h, h)
        self.linear1_mlp = nn.Linear(h, cfg.mlp_hidden_dim)
        self.linear2 = _Linear2(h + cfg.mlp_hidden_dim, h)
        self.q_norm = RMSNorm(d, eps=1e-6)
        self.k_norm = RMSNorm(d, eps=1e-6)
        self.modulation = Modulation(h, 3)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               video_tokens: int) -> torch.Tensor:
        """As DoubleStreamBlock.attend."""
        return attention(q, k, v, attn_mask=mask)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, video_tokens: int, rope: Rope,
                mask: torch.Tensor | None) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        xm = norm_modulate(x, shift, scale, eps=self.eps)
        q = self.q_norm(_heads(self.linear1_q(xm), self.heads))
        k = self.k_norm(_heads(self.linear1_k(xm), self.heads))
        v = _heads(self.linear1_v(xm), self.heads)
        n = video_tokens
        q = torch.cat([apply_rotary_emb(q[:, :n], *rope), q[:, n:]], 1)
        k = torch.cat([apply_rotary_emb(k[:, :n], *rope), k[:, n:]], 1)
        out = self.attend(q, k, v, mask, n).flatten(2)
        mlp = F.gelu(self.linear1_mlp(xm), approximate="tanh")
        return gated_add(x, self.linear2.fc(torch.cat([out, mlp], dim=-1)), gate)


class FinalLayer(nn.Module):
    def __init__(self, cfg: HunyuanVideo15DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.linear = nn.Linear(cfg.hidden_size, math.prod(cfg.patch_size) * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).float().chunk(2, dim=-1)  # (shift, scale): Tencent's order
        return self.linear(norm_modulate(x, shift[:, None], scale[:, None], eps=self.eps))
