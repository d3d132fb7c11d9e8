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

import torch
from torch import nn

from telefuser.ops.normalization import norm_modulate

# The presets and the layers' public helpers stay importable from here (callers and tests use these names).
from .dit_config import (COND_TYPE_GLYPH, COND_TYPE_IMAGE, COND_TYPE_TEXT, HUNYUAN15_8B,  # noqa: F401
                         HUNYUAN15_SR_8B, LATENT_CHANNELS, HunyuanVideo15DiTConfig)
from .dit_layers import (ByT5Mapper, DoubleStreamBlock, FinalLayer, PatchEmbed, Rope,  # noqa: F401
                         SingleStreamBlock, TimestepEmbedder, TokenRefiner, VisionProjection, _key_mask,
                         condition_latents, rope_cos_sin, timestep_embedding)
from ..block_stack import StackBlock


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
    BLOCK_LISTS = ("double_blocks", "single_blocks")  # streamed by block offload, in run order
    # Linears kept in the model dtype under quant_config (the conditioning paths every block reads, and the output)
    KEEP_PRECISION_LINEARS = ("time_in.*", "time_r_in.*", "guidance_in.*", "txt_in.*", "byt5_in.*", "vision_in.*",
                              "final_layer.*")

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

    def residual_stack(self) -> list[StackBlock]:
        """The blocks as step caches see them (telefuser.models.block_stack): the stack's residual is the video
        tokens' (the final layer reads only those). A double-stream block takes and returns (img, txt): the stream is
        img, and a skipped one passes txt through; a single-stream block takes and returns [img, txt] joined, the first
        `video_tokens` (its third argument) the video's."""
        def single_in(args: tuple) -> torch.Tensor:
            return args[0][:, : args[2]]

        def single_replace(args: tuple, stream: torch.Tensor | None) -> torch.Tensor:
            return args[0] if stream is None else torch.cat([stream, args[0][:, args[2]:]], 1)

        double = [StackBlock(b, lambda args: args[0], lambda args, out: out[0],
                             lambda args, stream: (args[0] if stream is None else stream, args[1]))
                  for b in self.double_blocks]
        single = [StackBlock(b, single_in, lambda args, out: out[:, : args[2]], single_replace)
                  for b in self.single_blocks]
        return double + single

    def attention_seams(self) -> list[nn.Module]:
        """The modules whose `attend(q, k, v, mask, video_tokens)` runs the joint attention, in block order (double-
        then single-stream): where sequence parallelism and the plan's sparse attention (SSTA) hook in."""
        return [*self.double_blocks, *self.single_blocks]

    def teacache_input(self, block_args: tuple) -> torch.Tensor:
        """TeaCache's signal for this DiT, as LightX2V fits its HunyuanVideo-1.5 polynomials: the first double-stream
        block's modulated video stream norm(img) * (1 + scale1) + shift1 (`block_args` that block's arguments)."""
        img, _txt, vec = block_args[:3]
        block = self.double_blocks[0]
        shift, scale = block.img_mod(vec)[:2]
        return norm_modulate(img, shift, scale, eps=block.eps)

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
