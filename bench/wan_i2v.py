"""Image-to-video and Wan2.2 on one GPU (issue 9): TeleFuser's components beside diffusers' / transformers', same
weights, same call.

Full-size random weights are built in memory on the GPU (no files): each TeleFuser model is built on the meta
device and given random tensors of its own keys (norm gains 1, biases N(0, 0.02), weights N(0, 1/fan_in)),
assigned as the runtime's loader assigns a checkpoint; the peer gets *the same tensors* under its key names
(telefuser.models.*_keys converters), built as `from_pretrained` builds it (parameters on meta, buffers such as
RoPE tables real, `_keep_in_fp32_modules` upcast to float32), so one copy of the weights serves both sides. Ours
is measured first, then freed before the peer's turn (the peer keeps the shared tensors alive).

- Wan2.1 I2V 14B, 480p (832x480) 81 frames, bf16: one denoising step with CFG (conditional + unconditional
  forward at batch 1 each) as our runtime runs it (`telefuser.runtime.stages.denoise.guided`, the DiT under the
  dispatch table the compiler plans for this machine: attention backend, Triton kernels) and as diffusers'
  WanImageToVideoPipeline runs it (latents concatenated with the condition, `encoder_hidden_states_image`,
  guidance in bf16); latent [1, 16, 21, 60, 104] + y [1, 20, 21, 60, 104] (32760 tokens), CLIP tokens
  [1, 257, 1280], text [1, 512, 4096];
- CLIP ViT-H/14 image encode, float16 (our 480p recipe's image-encoder dtype, Wan's clip_dtype): ours on the
  [-1, 1] frame (its bicubic resize inside) against transformers' CLIPVisionModel on the same preprocessed
  224 x 224 input, `hidden_states[-2]` as diffusers' pipeline takes it (CLIPImageProcessor's PIL work is not
  timed);
- Wan2.1 VAE encode of the conditioning video [image, 80 zero frames] (bf16) against
  AutoencoderKLWan.encode(...).latent_dist.mode() (diffusers' `retrieve_latents(sample_mode="argmax")`);
- Wan2.2 TI2V-5B, 720p (1280x704) 121 frames, bf16: one CFG step with per-token timesteps, the image's latent in
  the first latent frame (our wan_ti2v pipeline: `token_timesteps` + `guided`) against diffusers'
  expand_timesteps path (mask mix, timestep [1, 27280]); latent [1, 48, 31, 44, 80];
- Wan2.2 VAE (telefuser/models/wan/vae22.py) against AutoencoderKLWan in its Wan2.2 configuration: encode of
  the 121-frame video, encode of the image alone (what TI2V's image-to-video encodes) and decode of the latent.

Per row: median wall time (synchronised; warm-up first: a full call for the DiTs, a 5-frame call for the VAEs),
peak allocated memory (weights included, and above what was resident before the call), relative error
||ours - theirs|| / ||theirs|| of the outputs (float32; the VAE latents compared normalised, as the pipelines
use them). Targets (issue 9): DiT step at most 0.8x diffusers'; VAE encode/decode no slower and no hungrier
(2% allowed for noise, as bench/wan21.py). The table grows in $OUT/wan_i2v.md after each section.

GPU: `PYTHONPATH=. python3 bench/wan_i2v.py` (about 4 minutes on an H100); CPU check of the logic at tiny
sizes: `python bench/wan_i2v.py --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from bench.common import Measured, free, measure
from bench.weights_random import meta_model, random_model

CFG_SCALE = 5.0
TIMESTEP = 900.0


@dataclass
class Setup:
    """Sizes, dtypes and repetitions: full size on the GPU, tiny on the CPU (--cpu-smoke)."""

    smoke: bool
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    clip_dtype: torch.dtype = torch.float16
    i2v: Any = None  # WanDiTConfig of Wan2.1 I2V 14B
    ti2v: Any = None  # WanDiTConfig of Wan2.2 TI2V-5B
    clip: Any = None  # ClipVisionConfig
    vae: Any = None  # WanVAEConfig
    vae22: Any = None  # Wan22VAEConfig
    i2v_frames_hw: tuple[int, int, int] = (81, 480, 832)
    ti2v_frames_hw: tuple[int, int, int] = (121, 704, 1280)
    text_len: int = 512  # diffusers' I2V attention splits the image tokens off by Wan's 512 text tokens
    runs: dict[str, int] = field(default_factory=lambda: {"dit14": 2, "dit5": 3, "clip": 10, "vae": 3, "vae22": 2})

    def __post_init__(self) -> None:
        from telefuser.models.clip.vision import VIT_H_14, ClipVisionConfig
        from telefuser.models.wan.dit import WAN21_14B, WanDiTConfig
        from telefuser.models.wan.vae import WanVAEConfig
        from telefuser.models.wan.vae22 import Wan22VAEConfig

        if not self.smoke:
            self.i2v = WanDiTConfig(**{**WAN21_14B.__dict__, "model_type": "i2v", "in_dim": 36})
            # Wan2.2 TI2V-5B (Wan2.2's wan/configs/wan_ti2v_5B.py)
            self.ti2v = WanDiTConfig(in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30)
            self.clip, self.vae, self.vae22 = VIT_H_14, WanVAEConfig(), Wan22VAEConfig()
            return
        from telefuser.models.tiny import TINY_ARCH

        self.device, self.dtype, self.clip_dtype = "cpu", torch.float32, torch.float32
        self.clip = ClipVisionConfig(**TINY_ARCH["image_encoder"])
        self.i2v = WanDiTConfig(**TINY_ARCH["dit_i2v"])
        self.ti2v = WanDiTConfig(**TINY_ARCH["dit_ti2v"])
        self.vae = WanVAEConfig(**TINY_ARCH["vae"])
        self.vae22 = Wan22VAEConfig(z_dim=48, base_dim=8, decoder_base_dim=16, num_res_blocks=1)
        self.i2v_frames_hw, self.ti2v_frames_hw = (9, 32, 48), (9, 64, 96)
        self.runs = {k: 1 for k in self.runs}


# ---------------------------------------------------------------------------------------------- measuring


def log(message: str) -> None:
    print(f"[wan_i2v {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rel_err(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    if ours.shape != theirs.shape:
        raise RuntimeError(f"{what}: TeleFuser's output has shape {tuple(ours.shape)}, the peer's "
                           f"{tuple(theirs.shape)}: the two sides did not compute the same thing")
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()


# ---------------------------------------------------------------------------------------------- models


def peer_model(make: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], setup: Setup) -> nn.Module:
    """A diffusers / transformers model holding `state`'s tensors, built as from_pretrained(torch_dtype=...)
    builds it: parameters on meta, buffers real, `_keep_in_fp32_modules` parameters in float32."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = make()
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    expected = model.state_dict().keys()
    if not any(k.startswith("vision_model.") for k in expected):  # transformers >= 5: a bare CLIPVisionModel
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    state = {k: v.float() if any(m in k.split(".") for m in keep) else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer in some transformers versions
    if missing or unexpected:
        raise RuntimeError(f"{type(model).__name__}: the converted weights miss {missing[:5]} and have unexpected "
                           f"{unexpected[:5]}")
    if any(p.is_meta for p in model.parameters()):
        raise RuntimeError(f"{type(model).__name__}: parameters left on the meta device")
    return model.to(setup.device).eval().requires_grad_(False)


def dispatch_table(class_: str, arch: dict, dtype: torch.dtype) -> dict[str, str]:
    """The compiler's dispatch decisions for one model on this machine (what a plan compiled here records)."""
    from telefuser.compiler.dispatch import build_dispatch
    from telefuser.compiler.target import resolve_target
    from telefuser.schema.recipe import Target

    model = SimpleNamespace(name="m", class_=class_, compute_dtype=str(dtype).removeprefix("torch."), arch=arch,
                            attributes=SimpleNamespace(fp8_layout=None))
    return {e.op: str(e.impl) for e in build_dispatch([model], {}, resolve_target(Target()))}


def describe(table: Mapping[str, str]) -> str:
    by_impl: dict[str, list[str]] = {}
    for op, impl in table.items():
        by_impl.setdefault(impl, []).append(op)
    return "; ".join(f"{', '.join(ops)}: {impl}" for impl, ops in by_impl.items()) or "no recorded choice (auto)"


def diffusers_dit(cfg) -> Callable[[], nn.Module]:
    from diffusers import WanTransformer3DModel

    image = {"image_dim": cfg.image_dim, "added_kv_proj_dim": cfg.dim} if cfg.model_type == "i2v" else {}
    return lambda: WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, **image)


def diffusers_vae(cfg, wan22: bool) -> Callable[[], nn.Module]:
    from diffusers import AutoencoderKLWan

    common = dict(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                  num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temporal_downsample))
    if not wan22:
        return lambda: AutoencoderKLWan(**common)
    from telefuser.models.wan.vae22 import LATENT_MEAN, LATENT_STD

    # diffusers' own Wan2.2 VAE config (scripts/convert_wan_to_diffusers.py)
    return lambda: AutoencoderKLWan(**common, decoder_base_dim=cfg.decoder_base_dim, is_residual=True,
                                    in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                                    scale_factor_temporal=4, latents_mean=list(LATENT_MEAN),
                                    latents_std=list(LATENT_STD))


def latent_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a diffusers VAE's config, shaped to normalise latents like `like`."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return (torch.tensor(vae.config.latents_mean, device=like.device).view(shape),
            torch.tensor(vae.config.latents_std, device=like.device).view(shape))


# ---------------------------------------------------------------------------------------------- rows


def row(what: str, ours: Measured, theirs: Measured, err: float, target: str) -> str:
    ratio = ours.ms / theirs.ms
    err_text = f"{err:.2e}" if math.isfinite(err) else f"{err} (non-finite outputs)"
    return (f"| {what} | {ours.ms:.1f} | {theirs.ms:.1f} | {ratio:.2f}x | {ours.peak_gib:.2f} (+{ours.extra_gib:.2f}) | "
            f"{theirs.peak_gib:.2f} (+{theirs.extra_gib:.2f}) | {err_text} | {target} |")


def dit_target(ours: Measured, theirs: Measured) -> str:
    ratio = ours.ms / theirs.ms
    return f"<= 0.80x: {'met' if ratio <= 0.8 else 'MISSED'}"


def vae_target(ours: Measured, theirs: Measured) -> str:
    ok = ours.ms <= theirs.ms * 1.02 and ours.peak_gib <= theirs.peak_gib * 1.02
    return f"no slower, no hungrier: {'met' if ok else 'MISSED'}"


def cfg_step_inputs(setup: Setup, cfg, frames_hw: tuple[int, int, int], ratio: tuple[int, int], z_dim: int,
                    seed: int) -> dict[str, torch.Tensor]:
    frames, height, width = frames_hw
    latent = (1, z_dim, (frames - 1) // ratio[0] + 1, height // ratio[1], width // ratio[1])
    gen = torch.Generator(device=setup.device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=setup.device)

    return {"latents": randn(*latent), "context": randn(1, setup.text_len, cfg.text_dim).to(setup.dtype),
            "context_null": randn(1, setup.text_len, cfg.text_dim).to(setup.dtype)}


def bench_i2v_dit(setup: Setup) -> tuple[list[str], dict[str, str]]:
    """Wan2.1 I2V 14B: one CFG step, ours (runtime's guided + plan dispatch) vs diffusers' pipeline loop."""
    from telefuser.distributed.rank import RankContext
    from telefuser.models.wan.dit import WanDiT
    from telefuser.models.wan.dit_keys import wan_to_diffusers
    from telefuser.ops.dispatch import use_dispatch
    from telefuser.runtime.stages.denoise import guided
    from telefuser.runtime.stages.vae_encode import first_frame_mask

    cfg = setup.i2v
    frames, height, width = setup.i2v_frames_hw
    inputs = cfg_step_inputs(setup, cfg, setup.i2v_frames_hw, (4, 8), 16, seed=1)
    latents = inputs["latents"]
    gen = torch.Generator(device=setup.device).manual_seed(2)
    mask = first_frame_mask(frames, 4, *latents.shape[3:]).to(setup.device)
    y = torch.cat([mask, torch.randn(latents.shape, generator=gen, device=setup.device)], dim=1)
    tokens = setup.clip.num_tokens
    clip_fea = torch.randn(1, tokens, cfg.image_dim, generator=gen, device=setup.device)
    t = torch.tensor([TIMESTEP])

    log("Wan2.1 I2V DiT: building random weights")
    ours = random_model(lambda: WanDiT(cfg), setup.device, setup.dtype, seed=10)
    table = dispatch_table("WanDiT", {"dim": cfg.dim, "num_heads": cfg.num_heads}, setup.dtype)
    rank = RankContext(device=torch.device(setup.device))
    extra = {"y": y.to(setup.dtype), "clip_fea": clip_fea.to(setup.dtype)}  # once per run, as the denoise stage

    def ours_step() -> torch.Tensor:
        with use_dispatch(table):
            return guided(ours, latents.to(setup.dtype), t.to(setup.device), inputs["context"],
                          inputs["context_null"], CFG_SCALE, rank, extra)

    log("Wan2.1 I2V DiT: TeleFuser")
    mine = measure(ours_step, setup.runs["dit14"])
    state = wan_to_diffusers(ours.state_dict())
    del ours, ours_step
    free()
    ref = peer_model(diffusers_dit(cfg), state, setup)
    del state
    image_embeds = clip_fea.to(setup.dtype)
    t_dev = t.to(setup.device)

    def theirs_step() -> torch.Tensor:  # WanImageToVideoPipeline's loop body, Wan2.1 (no expand_timesteps)
        model_in = torch.cat([latents, y], dim=1).to(setup.dtype)
        timestep = t_dev.expand(model_in.shape[0])
        with ref.cache_context("cond"):
            cond = ref(hidden_states=model_in, timestep=timestep, encoder_hidden_states=inputs["context"],
                       encoder_hidden_states_image=image_embeds, return_dict=False)[0]
        with ref.cache_context("uncond"):
            uncond = ref(hidden_states=model_in, timestep=timestep, encoder_hidden_states=inputs["context_null"],
                         encoder_hidden_states_image=image_embeds, return_dict=False)[0]
        return uncond + CFG_SCALE * (cond - uncond)

    log("Wan2.1 I2V DiT: diffusers")
    theirs = measure(theirs_step, setup.runs["dit14"])
    del ref, theirs_step
    free()
    what = (f"Wan2.1 I2V 14B DiT step with CFG (2 forwards at batch 1), {width}x{height} {frames}f: latent "
            f"{list(latents.shape)} + y {list(y.shape)}, CLIP [1, {tokens}, {cfg.image_dim}], text "
            f"[1, {setup.text_len}, {cfg.text_dim}], {str(setup.dtype).removeprefix('torch.')}")
    return [row(what, mine, theirs, rel_err(mine.out, theirs.out, "I2V DiT step"), dit_target(mine, theirs))], table


def bench_clip(setup: Setup) -> list[str]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from telefuser.models.clip.vision import ClipVisionEncoder, preprocess
    from telefuser.models.clip.vision_keys import wan_to_hf
    from telefuser.ops.dispatch import use_dispatch

    cfg = setup.clip
    _, height, width = setup.i2v_frames_hw
    log("CLIP: building random weights")
    ours = random_model(lambda: ClipVisionEncoder(cfg), setup.device, setup.clip_dtype, seed=20)
    table = dispatch_table("CLIPVision", {}, setup.clip_dtype)
    gen = torch.Generator(device=setup.device).manual_seed(3)
    pixels = torch.rand(1, 3, height, width, generator=gen, device=setup.device) * 2 - 1  # the fitted frame

    def ours_encode() -> torch.Tensor:
        with use_dispatch(table):
            return ours(pixels)

    log("CLIP: TeleFuser")
    mine = measure(ours_encode, setup.runs["clip"])
    state = wan_to_hf(ours.state_dict())
    del ours, ours_encode
    free()
    hf_config = CLIPVisionConfig(hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim, num_attention_heads=cfg.num_heads,
                                 num_hidden_layers=cfg.num_layers, image_size=cfg.image_size,
                                 patch_size=cfg.patch_size, hidden_act=cfg.activation, layer_norm_eps=cfg.eps)
    ref = peer_model(lambda: CLIPVisionModel(hf_config), state, setup).to(setup.clip_dtype)
    del state
    pixel_values = preprocess(pixels, cfg.image_size).to(setup.clip_dtype)

    def theirs_encode() -> torch.Tensor:  # WanImageToVideoPipeline.encode_image, after CLIPImageProcessor
        return ref(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]

    log("CLIP: transformers")
    theirs = measure(theirs_encode, setup.runs["clip"])
    attn = getattr(ref.config, "_attn_implementation", "?")
    del ref, theirs_encode
    free()
    what = (f"CLIP ViT-H/14 image encode, {str(setup.clip_dtype).removeprefix('torch.')}, [1, 3, {height}, {width}] "
            f"-> [1, {cfg.num_tokens}, {cfg.dim}] (penultimate block; transformers CLIPVisionModel, attention {attn}, "
            f"on the same {cfg.image_size}x{cfg.image_size} input)")
    return [row(what, mine, theirs, rel_err(mine.out, theirs.out, "CLIP"), "none set (ratio shown)")]


def bench_wan21_vae_encode(setup: Setup) -> list[str]:
    from telefuser.models.wan.vae import WanVAE
    from telefuser.models.wan.vae_keys import wan_to_diffusers
    from telefuser.ops.dispatch import use_dispatch

    frames, height, width = setup.i2v_frames_hw
    log("Wan2.1 VAE: building random weights")
    ours = random_model(lambda: WanVAE(setup.vae), setup.device, setup.dtype, seed=30)
    table = dispatch_table("WanVAE", {}, setup.dtype)
    gen = torch.Generator(device=setup.device).manual_seed(4)
    image = (torch.rand(1, 3, 1, height, width, generator=gen, device=setup.device) * 2 - 1).to(setup.dtype)
    video = torch.cat([image, image.new_zeros(1, 3, frames - 1, height, width)], dim=2)  # as vae_encode builds it
    short = video[:, :, :5]

    def ours_encode(v: torch.Tensor = video) -> torch.Tensor:
        with use_dispatch(table):
            return ours.encode(v)

    log("Wan2.1 VAE encode: TeleFuser")
    mine = measure(ours_encode, setup.runs["vae"], warmup=lambda: ours_encode(short))
    state = wan_to_diffusers(ours.state_dict())
    del ours, ours_encode
    free()
    ref = peer_model(diffusers_vae(setup.vae, wan22=False), state, setup)
    del state

    log("Wan2.1 VAE encode: diffusers")
    theirs = measure(lambda: ref.encode(video).latent_dist.mode(), setup.runs["vae"],
                     warmup=lambda: ref.encode(short).latent_dist.mode())
    mean, std = latent_stats(ref, theirs.out)
    err = rel_err(mine.out, (theirs.out - mean) / std, "Wan2.1 VAE encode")
    del ref
    free()
    what = (f"Wan2.1 VAE encode of the conditioning video [image, {frames - 1} zero frames] "
            f"{[1, 3, frames, height, width]} -> {list(mine.out.shape)}, {str(setup.dtype).removeprefix('torch.')}")
    return [row(what, mine, theirs, err, vae_target(mine, theirs))]


def bench_ti2v_dit(setup: Setup) -> list[str]:
    """Wan2.2 TI2V-5B with an image: one CFG step, per-token timesteps (ours) vs expand_timesteps (diffusers)."""
    from telefuser.distributed.rank import RankContext
    from telefuser.models.wan.dit import WanDiT
    from telefuser.models.wan.dit_keys import wan_to_diffusers
    from telefuser.ops.dispatch import use_dispatch
    from telefuser.runtime.stages.denoise import guided, token_timesteps

    cfg = setup.ti2v
    frames, height, width = setup.ti2v_frames_hw
    inputs = cfg_step_inputs(setup, cfg, setup.ti2v_frames_hw, (4, 16), 48, seed=5)
    latents = inputs["latents"]
    gen = torch.Generator(device=setup.device).manual_seed(6)
    first = torch.randn((*latents.shape[:2], 1, *latents.shape[3:]), generator=gen, device=setup.device)
    t = torch.tensor(TIMESTEP)  # a solver timestep: a CPU scalar, as the runtime's solver keeps them

    log("TI2V-5B DiT: building random weights")
    ours = random_model(lambda: WanDiT(cfg), setup.device, setup.dtype, seed=40)
    table = dispatch_table("WanDiT", {"dim": cfg.dim, "num_heads": cfg.num_heads}, setup.dtype)
    rank = RankContext(device=torch.device(setup.device))
    patch = tuple(cfg.patch_size)

    def ours_step() -> torch.Tensor:  # the denoise stage's step with a first frame
        with use_dispatch(table):
            x = torch.cat([first, latents[:, :, 1:]], dim=2)
            t_in = token_timesteps(t, x, patch)
            return guided(ours, x.to(setup.dtype), t_in.to(setup.device), inputs["context"], inputs["context_null"],
                          CFG_SCALE, rank)

    log("TI2V-5B DiT: TeleFuser")
    mine = measure(ours_step, setup.runs["dit5"])
    tokens = int(token_timesteps(t, latents, patch).shape[1])
    state = wan_to_diffusers(ours.state_dict())
    del ours, ours_step
    free()
    ref = peer_model(diffusers_dit(cfg), state, setup)
    del state
    mask = torch.ones(1, 1, *latents.shape[2:], device=setup.device)
    mask[:, :, 0] = 0
    t_dev = t.to(setup.device)

    def theirs_step() -> torch.Tensor:  # WanImageToVideoPipeline's loop body with expand_timesteps
        model_in = ((1 - mask) * first + mask * latents).to(setup.dtype)
        timestep = (mask[0][0][:, ::2, ::2] * t_dev).flatten().unsqueeze(0).expand(latents.shape[0], -1)
        with ref.cache_context("cond"):
            cond = ref(hidden_states=model_in, timestep=timestep, encoder_hidden_states=inputs["context"],
                       return_dict=False)[0]
        with ref.cache_context("uncond"):
            uncond = ref(hidden_states=model_in, timestep=timestep, encoder_hidden_states=inputs["context_null"],
                         return_dict=False)[0]
        return uncond + CFG_SCALE * (cond - uncond)

    log("TI2V-5B DiT: diffusers")
    theirs = measure(theirs_step, setup.runs["dit5"])
    del ref, theirs_step
    free()
    what = (f"Wan2.2 TI2V-5B DiT step with CFG (2 forwards at batch 1), image in the first latent frame, per-token "
            f"timesteps [1, {tokens}], {width}x{height} {frames}f: latent {list(latents.shape)}, text "
            f"[1, {setup.text_len}, {cfg.text_dim}], {str(setup.dtype).removeprefix('torch.')}")
    return [row(what, mine, theirs, rel_err(mine.out, theirs.out, "TI2V DiT step"), dit_target(mine, theirs))]


def bench_vae22(setup: Setup) -> list[str]:
    from telefuser.models.wan.vae22 import Wan22VAE
    from telefuser.models.wan.vae22_keys import wan_to_diffusers
    from telefuser.ops.dispatch import use_dispatch

    frames, height, width = setup.ti2v_frames_hw
    log("Wan2.2 VAE: building random weights")
    ours = random_model(lambda: Wan22VAE(setup.vae22), setup.device, setup.dtype, seed=50)
    table = dispatch_table("Wan22VAE", {}, setup.dtype)
    gen = torch.Generator(device=setup.device).manual_seed(7)
    video = (torch.rand(1, 3, frames, height, width, generator=gen, device=setup.device) * 2 - 1).to(setup.dtype)
    image = video[:, :, :1].contiguous()
    latent_frames = (frames - 1) // 4 + 1
    z = torch.randn(1, setup.vae22.z_dim, latent_frames, height // 16, width // 16, generator=gen,
                    device=setup.device).to(setup.dtype)
    runs = setup.runs["vae22"]

    def ours_call(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with use_dispatch(table):
                return fn()
        return call

    log("Wan2.2 VAE: TeleFuser encode / decode")
    mine = {"video": measure(ours_call(lambda: ours.encode(video)), runs,
                             warmup=ours_call(lambda: ours.encode(video[:, :, :5]))),
            "image": measure(ours_call(lambda: ours.encode(image)), max(runs, 3)),
            "decode": measure(ours_call(lambda: ours.decode(z)), runs, warmup=ours_call(lambda: ours.decode(z[:, :, :2])))}
    state = wan_to_diffusers(ours.state_dict())
    del ours
    free()
    ref = peer_model(diffusers_vae(setup.vae22, wan22=True), state, setup)
    del state
    mean, std = latent_stats(ref, z)
    raw = (z.float() * std + mean).to(setup.dtype)  # diffusers' pipelines denormalise before vae.decode

    log("Wan2.2 VAE: diffusers encode / decode")
    theirs = {"video": measure(lambda: ref.encode(video).latent_dist.mode(), runs,
                               warmup=lambda: ref.encode(video[:, :, :5]).latent_dist.mode()),
              "image": measure(lambda: ref.encode(image).latent_dist.mode(), max(runs, 3)),
              "decode": measure(lambda: ref.decode(raw, return_dict=False)[0], runs,
                                warmup=lambda: ref.decode(raw[:, :, :2], return_dict=False)[0])}
    dtype = str(setup.dtype).removeprefix("torch.")
    rows = []
    for key, what in (("video", f"Wan2.2 VAE encode of the video [1, 3, {frames}, {height}, {width}]"),
                      ("image", f"Wan2.2 VAE encode of the image alone [1, 3, 1, {height}, {width}] (TI2V's condition)")):
        err = rel_err(mine[key].out, (theirs[key].out - mean) / std, what)
        rows.append(row(f"{what} -> {list(mine[key].out.shape)}, {dtype}", mine[key], theirs[key], err,
                        vae_target(mine[key], theirs[key])))
    err = rel_err(mine["decode"].out, theirs["decode"].out, "Wan2.2 VAE decode")
    clamped = (theirs["decode"].out.abs() == 1).float().mean().item()
    rows.append(row(f"Wan2.2 VAE decode {list(z.shape)} -> {list(mine['decode'].out.shape)}, {dtype} "
                    f"({clamped:.0%} of the peer's values at the [-1, 1] clamp)", mine["decode"], theirs["decode"], err,
                    vae_target(mine["decode"], theirs["decode"])))
    return rows


def check_full_size_layouts() -> str:
    """--cpu-smoke: the full-size pairs the GPU run builds, on meta: our keys, converted, are the peer's keys with
    the peer's shapes (what the GPU run's strict loads need)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from telefuser.models.clip.vision import ClipVisionEncoder
    from telefuser.models.clip.vision_keys import wan_to_hf
    from telefuser.models.wan import dit_keys, vae22_keys, vae_keys
    from telefuser.models.wan.dit import WanDiT
    from telefuser.models.wan.vae import WanVAE
    from telefuser.models.wan.vae22 import Wan22VAE

    full = Setup(smoke=False)
    clip = full.clip
    hf_clip = CLIPVisionConfig(hidden_size=clip.dim, intermediate_size=clip.mlp_dim, num_attention_heads=clip.num_heads,
                               num_hidden_layers=clip.num_layers, image_size=clip.image_size,
                               patch_size=clip.patch_size, hidden_act=clip.activation, layer_norm_eps=clip.eps)
    pairs = [("Wan2.1 I2V 14B DiT", lambda: WanDiT(full.i2v), diffusers_dit(full.i2v), dit_keys.wan_to_diffusers),
             ("Wan2.2 TI2V-5B DiT", lambda: WanDiT(full.ti2v), diffusers_dit(full.ti2v), dit_keys.wan_to_diffusers),
             ("CLIP ViT-H/14", lambda: ClipVisionEncoder(clip), lambda: CLIPVisionModel(hf_clip), wan_to_hf),
             ("Wan2.1 VAE", lambda: WanVAE(full.vae), diffusers_vae(full.vae, False), vae_keys.wan_to_diffusers),
             ("Wan2.2 VAE", lambda: Wan22VAE(full.vae22), diffusers_vae(full.vae22, True),
              vae22_keys.wan_to_diffusers)]
    done = []
    for name, ours, theirs, convert in pairs:
        mine = {k: tuple(v.shape) for k, v in convert(meta_model(ours).state_dict()).items()}
        ref = {k: tuple(v.shape) for k, v in meta_model(theirs).state_dict().items() if not k.endswith("position_ids")}
        if not any(k.startswith("vision_model.") for k in ref):
            mine = {k.removeprefix("vision_model."): v for k, v in mine.items()}
        if mine != ref:
            diff = sorted(set(mine.items()) ^ set(ref.items()))[:5]
            raise RuntimeError(f"full-size {name}: our converted keys/shapes differ from the peer's: {diff}")
        done.append(f"{name} {sum(math.prod(s) for s in mine.values()) / 1e9:.2f}B")
    return "Full-size key layouts checked on meta (ours converted = peer's, shapes equal): " + ", ".join(done) + "."


# ---------------------------------------------------------------------------------------------- main


def environment_line(setup: Setup) -> str:
    import diffusers
    import transformers

    versions = f"diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    if setup.smoke:
        return (f"CPU smoke run (tiny models, not a measurement): PyTorch {torch.__version__}, {versions}, "
                f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")
    from bench.common import environment

    return f"{environment()}, {versions}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (checks the logic)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("bench/wan_i2v.py measures on a CUDA GPU; use --cpu-smoke to check the logic on a CPU")
    from bench.common import out_dir

    setup = Setup(smoke=args.cpu_smoke)
    started = time.perf_counter()
    if not setup.smoke:
        torch.zeros(1, device="cuda")  # CUDA context outside every timing
    head = [f"Measured: {environment_line(setup)}.", "",
            "Random weights built in memory, one copy shared by both sides (peer built as from_pretrained builds it); "
            "median wall time after a warm-up; peak allocated GiB with weights (+ above what was resident); "
            "relative error ||ours - peer|| / ||peer|| in float32 (latents normalised as the pipelines use them).",
            "", "| stage | TeleFuser ms | peer ms | TeleFuser / peer | TeleFuser peak GiB | peer peak GiB | rel. error | "
            "target |", "|---|---|---|---|---|---|---|---|"]
    rows: list[str] = []
    notes: list[str] = [check_full_size_layouts()] if setup.smoke else []
    path = out_dir() / "wan_i2v.md"

    def flush() -> None:
        text = "\n".join(head + rows + [""] + notes) + "\n"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(path)

    i2v_rows, i2v_table = bench_i2v_dit(setup)
    rows += i2v_rows
    notes.append(f"TeleFuser DiT dispatch (the compiler's table for this machine): {describe(i2v_table)}.")
    flush()
    for section in (bench_clip, bench_wan21_vae_encode, bench_ti2v_dit, bench_vae22):
        rows += section(setup)
        flush()
    notes.append(f"Whole script: {time.perf_counter() - started:.0f} s.")
    flush()
    print("\n".join(head + rows + [""] + notes))


if __name__ == "__main__":
    main()
