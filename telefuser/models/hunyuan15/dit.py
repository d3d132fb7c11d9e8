"""HunyuanVideo-1.5 diffusion transformer (the 8.3B base DiT and the SR DiT), in Tencent's own parameter layout.

Module and parameter names follow the official checkpoints (tencent/HunyuanVideo-1.5 `transformer/<version>/
diffusion_pytorch_model.safetensors`, class `HunyuanVideo_1_5_DiffusionTransformer`), so those files load without
renaming; diffusers' `HunyuanVideo15Transformer3DModel` layout is converted by `dit_keys`.

Architecture (published config of every 1.5 transformer: hidden 2048, 16 heads of 128, MLP ratio 4, 54
double-stream blocks, 0 single-stream blocks, patch [1, 1, 1], RoPE over (t, h, w) with [16, 56, 56] head
channels and theta 256, Qwen2.5-VL text of 3584, byT5 glyph text of 1472, SigLIP image tokens of 1152):

- `img_in`: a Conv3d patch embedding of the noisy latent concatenated with its conditioning: 32 latent + 32
  condition latent + 1 mask = 65 channels for the base DiT (T2V: zero condition and mask; I2V: the first frame's
  latent at frame 0 and mask 1 there, see `condition_latents`); 32 + 33 + 33 = 98 for the SR DiT, whose extra 33
  are the upsampled, noised low-resolution latent and a mask of ones (`sr.py`).
- the conditioning tokens: Qwen2.5-VL hidden states through a 2-block token refiner (`txt_in`), byT5 states of the
  quoted glyph text through `byt5_in`, SigLIP image states through `vision_in` (I2V only), each plus a learned
  type embedding (`cond_type_embedding` rows 0 text, 1 glyph, 2 image). Per video, the valid tokens are joined in
  the published order [image, glyph, text]; padding tokens never reach a valid token (they are masked keys in the
  published code), so here they are dropped: a batch whose videos have equally many valid tokens attends without a
  mask, otherwise the shorter ones are padded and masked as keys.
- double-stream blocks (`double_blocks`): video and context tokens keep their own modulation, projections, q/k
  RMSNorms and MLPs and attend jointly; RoPE on the video tokens only. Single-stream blocks (`single_blocks`, none in
  the published 1.5 checkpoints but part of the published architecture) run on the joined sequence.
- `final_layer`: adaLN (shift, scale) and a linear to `out_channels * prod(patch_size)`.
- the time embedding `time_in` (+ `time_r_in` of the MeanFlow SR models, fed the next step's timestep; +
  `guidance_in` of guidance-embedded models) conditions every block through SiLU.

Dtypes: projections, modulation linears and the residual stream run in the model dtype (as the published code runs
under autocast); norms take float32 statistics (`telefuser.ops.normalization`), modulation and gates are applied in
float32 (`norm_modulate`, `gated_add`), RoPE angles are built in float64 and applied in float32.
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
from telefuser.ops.rotary import apply_rotary_emb

Rope = tuple[torch.Tensor, torch.Tensor]

COND_TYPE_TEXT, COND_TYPE_GLYPH, COND_TYPE_IMAGE = 0, 1, 2
LATENT_CHANNELS = 32  # the VAE's latent (AutoencoderKLConv3D latent_channels)


@dataclass(frozen=True)
class HunyuanVideo15DiTConfig:
    """Architecture numbers; defaults are the published 480p/720p T2V/I2V transformer (8.3B parameters).
    The SR transformers (720p_sr_distilled, 1080p_sr_distilled) differ in `in_channels` (98) and `use_meanflow`."""

    in_channels: int = 65  # img_in's input channels: latent + condition latent + mask (SR: + lq latent + lq mask)
    out_channels: int = LATENT_CHANNELS
    hidden_size: int = 2048
    heads_num: int = 16
    mlp_hidden_dim: int = 8192  # hidden_size * mlp_width_ratio (4)
    double_blocks: int = 54  # mm_double_blocks_depth
    single_blocks: int = 0  # mm_single_blocks_depth
    patch_size: list[int] = field(default_factory=lambda: [1, 1, 1])
    rope_dim_list: list[int] = field(default_factory=lambda: [16, 56, 56])
    rope_theta: float = 256.0
    text_states_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    refiner_blocks: int = 2  # txt_in.individual_token_refiner depth
    byt5_dim: int = 1472  # byT5-small (Glyph-SDXL-v2) d_model
    byt5_hidden: int = 2048  # byt5_in fc1/fc2 width
    vision_states_dim: int = 1152  # SigLIP so400m hidden size
    use_meanflow: bool = False  # time_r_in: SR distilled models
    guidance_embed: bool = False  # guidance_in: guidance-distilled models (none published for 1.5)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads_num:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads_num {self.heads_num}")
        if sum(self.rope_dim_list) != self.head_dim or any(d % 2 for d in self.rope_dim_list):
            raise ValueError(f"rope_dim_list {self.rope_dim_list} must be even and sum to the head dim {self.head_dim}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be [t, h, w], got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num


HUNYUAN15_8B = HunyuanVideo15DiTConfig()
HUNYUAN15_SR_8B = HunyuanVideo15DiTConfig(in_channels=98, use_meanflow=True)


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


def _pack(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-video token sequences [Li, D] -> [B, max Li, D] and a [B, max Li] bool mask of the real tokens (None when
    every Li is equal: nothing to mask)."""
    lengths = [r.shape[0] for r in rows]
    if len(set(lengths)) == 1:
        return torch.stack(rows), None
    longest = max(lengths)
    out = rows[0].new_zeros(len(rows), longest, rows[0].shape[-1])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


def _valid_rows(states: torch.Tensor, mask: torch.Tensor | None, what: str) -> list[torch.Tensor]:
    if mask is None:
        return list(states.unbind(0))
    if tuple(mask.shape) != tuple(states.shape[:2]):
        raise ValueError(f"{what} mask must be [batch, tokens] = {list(states.shape[:2])}, got {list(mask.shape)}")
    return [s[m.bool()] for s, m in zip(states, mask)]


class HunyuanVideo15DiT(nn.Module):
    def __init__(self, config: HunyuanVideo15DiTConfig) -> None:
        super().__init__()
        self.config = c = config
        h = c.hidden_size
        self.img_in = PatchEmbed(c.patch_size, c.in_channels, h)
        # The refiner's MLP is 4x wide in every published model (a constant of the published code, not a config key).
        self.txt_in = TokenRefiner(c.text_states_dim, h, c.heads_num, c.refiner_blocks, 4 * h)
        self.time_in = TimestepEmbedder(h)
        if c.use_meanflow:
            self.time_r_in = TimestepEmbedder(h)
        if c.guidance_embed:
            self.guidance_in = TimestepEmbedder(h)
        self.byt5_in = ByT5Mapper(c.byt5_dim, c.byt5_hidden, h)
        self.vision_in = VisionProjection(c.vision_states_dim, h)
        self.cond_type_embedding = nn.Embedding(3, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c) for _ in range(c.double_blocks))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c) for _ in range(c.single_blocks))
        self.final_layer = FinalLayer(c)
        self._rope_cache: dict[tuple[tuple[int, ...], torch.device], Rope] = {}

    def rope(self, grid: tuple[int, ...], device: torch.device) -> Rope:
        key = (grid, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_cos_sin(grid, self.config.rope_dim_list, self.config.rope_theta, device)
        return self._rope_cache[key]

    def time_vector(self, t: torch.Tensor, t_r: torch.Tensor | None = None,
                    guidance: torch.Tensor | None = None) -> torch.Tensor:
        """vec [B, hidden]: the timestep embedding (+ the MeanFlow `t_r` one, + the guidance one)."""
        dtype = self.img_in.proj.weight.dtype
        vec = self.time_in(t, dtype)
        if self.config.use_meanflow:
            if t_r is None:
                raise ValueError("this DiT is a MeanFlow model (time_r_in): pass t_r, the next step's timestep (0 at the last)")
            vec = vec + self.time_r_in(t_r, dtype)
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this DiT embeds the guidance scale (guidance_in): pass guidance (scale x 1000)")
            vec = vec + self.guidance_in(guidance, dtype)
        return vec

    def context(self, t: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor | None,
                byt5_states: torch.Tensor | None = None, byt5_mask: torch.Tensor | None = None,
                vision_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The context tokens of each video, [image, glyph, text] valid tokens joined, packed over the batch:
        ([B, L, hidden], [B, L] bool or None)."""
        dtype = self.img_in.proj.weight.dtype
        emb = self.cond_type_embedding.weight
        rows = _valid_rows(text_states.to(dtype), text_mask, "text")
        if any(r.shape[0] == 0 for r in rows):
            raise ValueError("a prompt has no valid text token (text_mask all zero); encode it with the prompt template")
        text, text_pad = _pack(rows)
        text = self.txt_in(text, t, text_pad) + emb[COND_TYPE_TEXT].to(dtype)
        text_rows = [r[m] for r, m in zip(text, text_pad)] if text_pad is not None else list(text.unbind(0))
        parts = [[] for _ in text_rows]
        if vision_states is not None and bool(vision_states.any()):  # all zeros: T2V, the image tokens are masked
            image = self.vision_in(vision_states.to(dtype)) + emb[COND_TYPE_IMAGE].to(dtype)
            for p, r in zip(parts, image.expand(len(parts), -1, -1).unbind(0)):
                p.append(r)
        if byt5_states is not None:
            glyph = self.byt5_in(byt5_states.to(dtype)) + emb[COND_TYPE_GLYPH].to(dtype)
            for p, r in zip(parts, _valid_rows(glyph, byt5_mask, "byt5")):
                p.append(r)
        for p, r in zip(parts, text_rows):
            p.append(r)
        return _pack([torch.cat(p, 0) for p in parts])

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        byt5_states: torch.Tensor | None = None,
        byt5_mask: torch.Tensor | None = None,
        vision_states: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        t_r: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, F, H, W] (the noisy latent; `y` [B, in_channels - C, F, H, W] the conditioning channels
        concatenated after it: `condition_latents`, and for the SR DiT `sr.sr_condition`), t [B] in [0, 1000],
        text_states [B, L, 3584] with text_mask [B, L] (1 = a token of the prompt, after the template crop),
        byt5_states [B, L2, 1472] with byt5_mask (None or a mask of zeros: no quoted text), vision_states
        [B or 1, 729, 1152] (None or zeros: T2V), t_r [B] the MeanFlow models' next timestep. Returns the
        prediction [B, out_channels, F, H, W] (flow velocity)."""
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"the DiT takes {self.config.in_channels} input channels (latent + conditioning), got {x.shape[1]}")
        dtype = self.img_in.proj.weight.dtype
        tokens = self.img_in.proj(x.to(dtype))
        grid = tuple(tokens.shape[2:])
        img = tokens.flatten(2).transpose(1, 2).contiguous()  # [B, S, hidden], (t, h, w) order
        rope = self.rope(grid, img.device)
        vec = self.time_vector(t, t_r, guidance)
        txt, txt_mask = self.context(t, text_states, text_mask, byt5_states, byt5_mask, vision_states)
        if txt.shape[0] != img.shape[0]:
            txt = txt.expand(img.shape[0], -1, -1)
        mask = _key_mask(txt_mask, img.shape[1])
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rope, mask)
        if len(self.single_blocks):
            n = img.shape[1]
            joined = torch.cat([img, txt], 1)
            for block in self.single_blocks:
                joined = block(joined, vec, n, rope, mask)
            img = joined[:, :n]
        return self.unpatchify(self.final_layer(img, vec), grid)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """[B, t*h*w, C*pt*ph*pw] -> [B, C, t*pt, h*ph, w*pw] (channels before the patch offsets, as published)."""
        (pt, ph, pw), (f, h, w) = self.config.patch_size, grid
        b, c = tokens.shape[0], self.config.out_channels
        x = tokens.view(b, f, h, w, c, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, f * pt, h * ph, w * pw)
