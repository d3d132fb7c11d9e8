"""HunyuanVideo-1.5 on one GPU (issue 22): full-size random weights in the official (Tencent) layout.

Part `dit`: one CFG step (the runtime's hy15_denoise per-step call: two batch-1 DiT calls, uncond + s (cond - uncond))
of the 8.3B DiT at 480p (848x480, Tencent's 16:9 bucket, as the plans run it) and 720p (1280x720), 121 frames, ours with the dispatch
table's Triton kernels and TORCH_SDPA, then SAGE_ATTN_2_8_8, beside diffusers' HunyuanVideo15Transformer3DModel on the
same weights (our state dict through dit_keys.tencent_to_diffusers); relative error of each step against our
TORCH_SDPA step. Target: at most 0.8x diffusers' time.
Part `vae`: decode of the 480p 121f latent, ours beside diffusers' AutoencoderKLHunyuanVideo15 (vae_keys), whole and
tiled; time and peak (target: no slower, no hungrier).
Part `sr`: the SR stage 480p -> 720p as hy15_sr_upsample + hy15_sr run it (upsampler, 6 MeanFlow Euler steps of the
SR DiT); time and peak.
Part `ssta`: SSTA at 720p, 121 frames (the sparse transformers' setting): the joint attention call of one block
(111,600 video + 256 context tokens, 16 heads of 128) through TORCH_CUDNN dense, SSTA on the 16-bit kernel and on
SAGE_ATTN_2_8_8's block-sparse mode, with the tile choice and the tiling timed apart and the density chosen; then
one DiT call (CFG-distilled: one call per step) dense against SSTA. Published: 1.87x end to end for 10 s 720p
against FlashAttention-3 (HunyuanVideo-1.5 README).
Part `taehv`: the TAEHV preview decoder of taehv1_5's shapes (random weights) beside our VAE's whole decode, both on
the 480p 121f latent.
Part `plan` (not in `all`: writes ~50 GB under --root): the 480p T2V + SR recipe, then its 24 GiB variant (streamed
encoders and DiTs), compiled against the same random files (bench/hy15_files' layout, tiny tokenizer) and run through
telefuser.load_plan; wall, peak against the estimate (and within 24 GiB for the variant).

Run on the device: `PYTHONPATH=. python3 bench/hunyuan15.py [--part dit vae sr ssta taehv plan] [--budget-s 540]
[--cpu-smoke]` (diffusers and accelerate carried as wheels; `all` = dit vae sr ssta taehv, about 11 minutes); writes
$OUT/hunyuan15.md and $OUT/hunyuan15.json after every row, prints the tables last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

BF16 = torch.bfloat16
RESULTS: dict = {}
SECTIONS: dict[str, list[str]] = {}
STATE = {"device": "cuda", "smoke": False, "deadline": math.inf, "header": ""}


def log(message: str) -> None:
    print(f"[hunyuan15 {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cuda() -> bool:
    return STATE["device"] == "cuda"


def free() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def left() -> float:
    return STATE["deadline"] - time.monotonic()


def timed(fn, warm: bool = True) -> tuple[float, float, object]:
    """(ms of one synchronised call after a warm-up (none when `warm` is False), peak GiB, its output)."""
    free()
    if warm:
        fn()
    if cuda():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda():
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda() else 0.0
    return (time.perf_counter() - start) * 1e3, peak, out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def emit(section: str, line: str, record: dict | None = None) -> None:
    """Add a table row and rewrite the outputs (partial results survive a kill or the budget)."""
    SECTIONS[section].append(line)
    if record is not None:
        RESULTS.setdefault(section, []).append(record)
    log(line)
    write_outputs()


def write_outputs() -> str:
    from bench.common import out_dir

    text = "\n".join([f"# HunyuanVideo-1.5 ({STATE['header']})", ""] +
                     [ln for lines in SECTIONS.values() for ln in (*lines, "")])
    out = out_dir()
    for name, body in (("hunyuan15.md", text + "\n"), ("hunyuan15.json", json.dumps(RESULTS, indent=1, default=str))):
        tmp = out / (name + ".tmp")
        tmp.write_text(body)
        tmp.replace(out / name)
    return text


def dit_config(sr: bool = False):
    from telefuser.models.hunyuan15.dit_config import HUNYUAN15_8B, HUNYUAN15_SR_8B, HunyuanVideo15DiTConfig
    from telefuser.models.hunyuan15.tiny import TINY_ARCH

    if STATE["smoke"]:
        # byt5_hidden 2048: diffusers fixes the glyph mapper's width at the published one
        return HunyuanVideo15DiTConfig(**{**TINY_ARCH["dit_sr" if sr else "dit"], "byt5_hidden": 2048})
    return HUNYUAN15_SR_8B if sr else HUNYUAN15_8B


def our_dit(cfg, dtype):
    from bench.weights_random import random_model
    from telefuser.models.hunyuan15.dit import HunyuanVideo15DiT

    return random_model(lambda: HunyuanVideo15DiT(cfg), STATE["device"], dtype, seed=0)


def peer(make, state: dict):
    """A diffusers model holding `state` (built as from_pretrained builds it: bench/wan_i2v.peer_model, which needs
    accelerate: carried as a wheel on the device; the CPU smoke run without it builds the tiny model and assigns)."""
    import importlib.util

    if importlib.util.find_spec("accelerate") or not STATE["smoke"]:
        from bench.wan_i2v import Setup, peer_model

        return peer_model(make, state, Setup(smoke=STATE["smoke"], device=STATE["device"]))
    model = make()
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    state = {k: v.float() if any(m in k.split(".") for m in keep) else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(STATE["device"]).eval().requires_grad_(False)


def diffusers_dit(cfg, state: dict):
    """diffusers' transformer holding our weights (converted to its layout), as from_pretrained builds it."""
    from diffusers import HunyuanVideo15Transformer3DModel

    from telefuser.models.hunyuan15.dit_keys import tencent_to_diffusers

    make = lambda: HunyuanVideo15Transformer3DModel(  # noqa: E731
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.heads_num,
        attention_head_dim=cfg.head_dim, num_layers=cfg.double_blocks, num_refiner_layers=cfg.refiner_blocks,
        mlp_ratio=cfg.mlp_hidden_dim / cfg.hidden_size, patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
        text_embed_dim=cfg.text_states_dim, text_embed_2_dim=cfg.byt5_dim, image_embed_dim=cfg.vision_states_dim,
        rope_theta=cfg.rope_theta, rope_axes_dim=tuple(cfg.rope_dim_list), use_meanflow=cfg.use_meanflow)
    return peer(make, tencent_to_diffusers(state)).to(STATE["device"])


def kernel_table(attention: str, sr: bool = False) -> dict:
    """The compiler's dispatch decisions for the DiT on this machine (what a plan compiled here records: our Triton
    kernels on a GPU, torch on the CPU), with `attention` as the recipe's attn_impl."""
    from dataclasses import asdict

    from bench.wan_i2v import dispatch_table

    dtype = torch.float32 if STATE["smoke"] else BF16
    return {**dispatch_table("HunyuanVideo15DiT", asdict(dit_config(sr)), dtype), "attention": attention}


def text_branches(cfg, dtype, gen) -> list[tuple]:
    """(text, text mask, byT5, byT5 mask) per CFG branch as hy15_text_encode makes them: text_len 1000 right-padded
    (prompt 200 valid tokens, negative 30), 256 glyph tokens (16 valid; the negative's none)."""
    dev = STATE["device"]
    text_len, glyphs = (24, 8) if STATE["smoke"] else (1000, 256)
    out = []
    for valid, glyph_valid in ((min(200, text_len - 4), 4 if STATE["smoke"] else 16), (min(30, text_len // 2), 0)):
        text = torch.randn(1, text_len, cfg.text_states_dim, generator=gen, device=dev).to(dtype)
        mask = (torch.arange(text_len, device=dev) < valid).long()[None]
        byt5 = torch.randn(1, glyphs, cfg.byt5_dim, generator=gen, device=dev).to(dtype) if glyph_valid else None
        bmask = (torch.arange(glyphs, device=dev) < glyph_valid).long()[None] if glyph_valid else None
        out.append((text, mask, byt5, bmask))
    return out


FRAMES = {"480p": (121, 480, 848), "720p": (121, 720, 1280)}  # (frames, height, width): the published 16:9 buckets


def bench_dit() -> None:
    """One CFG step per resolution: ours (TORCH_SDPA, SAGE_ATTN_2_8_8) and diffusers on the same weights."""
    from telefuser.models.hunyuan15.dit_layers import condition_latents
    from telefuser.ops.dispatch import use_dispatch

    sec = SECTIONS.setdefault("dit", [
        "## One CFG step (two batch-1 calls, CFG 6) of the 8.3B DiT, 121 frames", "",
        "| frame | implementation | ms / step | x diffusers | rel. error vs ours TORCH_SDPA | peak GiB |",
        "|---|---|---|---|---|---|"])
    cfg, dev = dit_config(), STATE["device"]
    dtype = torch.float32 if STATE["smoke"] else BF16
    ours = our_dit(cfg, dtype)
    scale, ref, last = 6.0, None, ("", 0.0)  # last: (frame, ms) of our last row, for the budget
    frames = {"tiny": (5, 32, 48)} if STATE["smoke"] else FRAMES
    for n, (res, (f, h, w)) in enumerate(frames.items()):
        warm = n == 0  # 720p: one timed call, kernels warmed at 480p (a conservative number for the Triton rows)
        gen = torch.Generator(device=dev).manual_seed(3)
        x = torch.randn(1, cfg.out_channels, 1 + (f - 1) // 4, h // 16, w // 16, generator=gen, device=dev).to(dtype)
        y = condition_latents(x.float()).to(dtype)
        t = torch.tensor([896.0], device=dev)  # exact in bf16: diffusers embeds the timestep in the model dtype
        cond, uncond = text_branches(cfg, dtype, gen)

        def ours_step(table: dict) -> torch.Tensor:
            with torch.inference_mode(), use_dispatch(table):  # hy15_denoise's per-step call
                v = ours(x, t, *cond, None, y=y).float()
                v_u = ours(x, t, *uncond, None, y=y).float()
                return v_u + scale * (v - v_u)

        def enough(what: str) -> bool:
            """Room for one more row: a warm-up and a timed call at the last row's time x the token ratio."""
            grow = 3.5 if last[0] != res else 1.0  # 720p from a 480p time: 2.3x the tokens, attention quadratic
            need = last[1] / 1e3 * (2 if warm else 1) * grow + 30
            if STATE["smoke"] or left() > need:
                return True
            emit("dit", f"| {res} | {what}: skipped, {left():.0f} s of the budget left (about {need:.0f} needed) "
                        "| | | | |")
            return False

        rows, exact = {}, None
        for impl in ("TORCH_SDPA", "SAGE_ATTN_2_8_8"):
            if not enough(f"TeleFuser, attention {impl}"):
                continue
            try:
                ms, peak, out = timed(lambda: ours_step(kernel_table(impl)), warm)
            except Exception as exc:  # noqa: BLE001 (a backend this machine lacks is a row, not an abort)
                emit("dit", f"| {res} | TeleFuser, attention {impl} | failed: {type(exc).__name__}: {str(exc)[:120]} "
                            "| | | |")
                continue
            exact, last = (out if exact is None else exact), (res, ms)
            rows[f"TeleFuser HunyuanVideo15DiT (dispatch below), attention {impl}"] = (ms, rel_err(out, exact), peak)
        if exact is None:
            continue
        if ref is None:
            ref = diffusers_dit(cfg, ours.state_dict())  # the same tensors, diffusers' names
        vision = torch.zeros(1, 729 if not STATE["smoke"] else 4, cfg.vision_states_dim, device=dev, dtype=dtype)
        model_in = torch.cat([x, y], dim=1)

        def forward(branch: tuple) -> torch.Tensor:
            text, mask, byt5, bmask = branch
            if byt5 is None:  # diffusers' pipeline passes zero glyph tokens with a zero mask
                byt5 = torch.zeros(1, cond[2].shape[1], cfg.byt5_dim, device=dev, dtype=dtype)
                bmask = torch.zeros(1, cond[2].shape[1], dtype=torch.long, device=dev)
            return ref(hidden_states=model_in, timestep=t.to(dtype), encoder_hidden_states=text, encoder_attention_mask=mask,
                       encoder_hidden_states_2=byt5, encoder_attention_mask_2=bmask, image_embeds=vision,
                       return_dict=False)[0].float()

        def theirs() -> torch.Tensor:
            with torch.inference_mode():
                v, v_u = forward(cond), forward(uncond)
            return v_u + scale * (v - v_u)

        theirs_ms = math.nan
        try:
            if not enough("diffusers"):
                raise torch.OutOfMemoryError("skipped for the budget")
            theirs_ms, peak, out = timed(theirs, warm)
            rows["diffusers HunyuanVideo15Transformer3DModel (SDPA default)"] = (theirs_ms, rel_err(out, exact), peak)
        except torch.OutOfMemoryError as exc:
            emit("dit", f"| {res} | diffusers: {str(exc)[:80]} | | | | |")
        free()
        for name, (ms, err, peak) in rows.items():
            emit("dit", f"| {res} {w}x{h} | {name} | {ms:.0f} | {ms / theirs_ms:.2f}x | {err:.2e} | {peak:.1f} |",
                 {"frame": res, "impl": name, "ms": ms, "x_diffusers": ms / theirs_ms, "rel_err": err,
                  "peak_gib": peak})
    from bench.wan_i2v import describe

    sec.append(f"\nDispatch (the compiler's, TORCH_SDPA row): {describe(kernel_table('TORCH_SDPA'))}.")
    sec.append("Target: ours at most 0.8x diffusers' time. Errors: each CFG step against our TORCH_SDPA step "
               "(random weights, CFG 6 amplifies the cond - uncond difference).")


SSTA_RECORD = {"sparse_impl": "ssta", "dense_timesteps": 0, "dense_layers": 0, "tile_size": [6, 8, 8],
               "win_size": [3, 3, 3], "ssta_topk": 64, "ssta_lambda": 0.7}  # the released attn_param


def ssta_attention_rows(cfg, dtype: torch.dtype, gen: torch.Generator) -> None:
    """One block's joint attention call at 720p 121f: dense cuDNN, then SSTA on both kernels, and SSTA's parts."""
    from telefuser.ops import ssta
    from telefuser.ops.attention import attention
    from telefuser.schema import ssta as geometry

    grid, heads, d = ((2, 6, 9), 2, 32) if STATE["smoke"] else ((31, 45, 80), 16, 128)
    video, ctx = math.prod(grid), 256 if not STATE["smoke"] else 12
    q, k, v = (torch.randn(1, video + ctx, heads, d, generator=gen, device=STATE["device"]).to(dtype)
               for _ in range(3))
    tile, window, topk = geometry.effective(grid, tuple(cfg.tile_size), tuple(cfg.win_size), cfg.ssta_topk)
    tiles = geometry.tile_grid(grid, tile)

    def choose() -> torch.Tensor:
        qt, kt = (ssta.tile_tokens(t[:, :video], grid, tile)[0] for t in (q, k))
        return ssta.tile_mask(qt, kt, tiles, window, topk, cfg.ssta_lambda, 1, 1)

    dense_ms, _, _ = timed(lambda: attention(q, k, v, "TORCH_CUDNN"))
    density = choose()[:, : math.prod(tiles), : math.prod(tiles)].float().mean().item()
    emit("ssta", f"| attention call | TORCH_CUDNN (dense) | {dense_ms:.1f} | 1.00x | 1 | |",
         {"what": "attention", "impl": "TORCH_CUDNN", "ms": dense_ms})
    for name, quantized in (("SSTA_ATTN (16-bit kernel)", None), ("SAGE_ATTN_2_8_8 + ssta", "SAGE_ATTN_2_8_8")):
        ms, peak, out = timed(lambda: ssta.ssta_attention(q, k, v, grid, cfg, quantized=quantized))
        note = f"peak {peak:.1f} GiB"
        if quantized is None:  # the kernel against the PyTorch path on one head (per-head masks: the same tiles)
            one = ssta.ssta_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], grid, cfg, use_kernel=False)
            note += f"; head 0 against the PyTorch path: rel. error {rel_err(out[:, :, :1], one):.1e}"
        emit("ssta", f"| attention call | {name} | {ms:.1f} | {dense_ms / ms:.2f}x | {density:.3f} | {note} |",
             {"what": "attention", "impl": name, "ms": ms, "speedup": dense_ms / ms, "density": density})
    choose_ms, _, _ = timed(choose)
    tile_ms, _, _ = timed(lambda: [ssta.tile_tokens(t, grid, tile) for t in (q, k, v)])
    emit("ssta", f"| of which | tile choice (means, importance, top-k, window) | {choose_ms:.1f} | | | |")
    emit("ssta", f"| of which | tiling q, k, v (zero padding to {tiles} tiles) | {tile_ms:.1f} | | | |")


def bench_ssta() -> None:
    """720p 121f: one joint attention call and one DiT call, dense against SSTA (see the module)."""
    from types import SimpleNamespace

    from telefuser.models.hunyuan15.dit_layers import condition_latents
    from telefuser.ops.dispatch import use_dispatch
    from telefuser.runtime.skip_work import _SparseWrapper

    sec = SECTIONS.setdefault("ssta", [
        "## SSTA at 720p, 121 frames (latent grid 31 x 45 x 80, tiles 6 x 8 x 8, window 3 x 3 x 3, top-32)", "",
        "| what | implementation | ms | x dense | density (video tiles) | note |", "|---|---|---|---|---|---|"])
    dev, dtype = STATE["device"], (torch.float32 if STATE["smoke"] else BF16)
    record = dict(SSTA_RECORD, tile_size=[1, 4, 8]) if STATE["smoke"] else SSTA_RECORD
    gen = torch.Generator(device=dev).manual_seed(5)
    ssta_attention_rows(SimpleNamespace(**record), dtype, gen)
    free()
    if left() < 120 and not STATE["smoke"]:
        emit("ssta", f"| DiT call | skipped: {left():.0f} s of the budget left | | | | |")
        return
    dit_cfg = dit_config()
    ours = our_dit(dit_cfg, dtype)
    f, h, w = (5, 96, 144) if STATE["smoke"] else FRAMES["720p"]
    x = torch.randn(1, dit_cfg.out_channels, 1 + (f - 1) // 4, h // 16, w // 16, generator=gen, device=dev).to(dtype)
    y = condition_latents(x.float()).to(dtype)
    t = torch.tensor([896.0], device=dev)
    cond = text_branches(dit_cfg, dtype, gen)[0]

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return ours(x, t, *cond, None, y=y)

    results = {}
    for impl in ("TORCH_SDPA", "SSTA_ATTN", "SAGE_ATTN_2_8_8"):
        wrapper = _SparseWrapper(ours, record) if impl != "TORCH_SDPA" else None
        try:
            with use_dispatch(kernel_table(impl)):
                results[impl] = timed(call, warm=STATE["smoke"] or impl == "TORCH_SDPA")
        finally:
            if wrapper is not None:
                wrapper.detach()
        ms, peak, _ = results[impl]
        base = results["TORCH_SDPA"][0]
        emit("ssta", f"| DiT call (one step, CFG-distilled) | {impl}{' + ssta' if impl.startswith('SAGE') else ''} | "
                     f"{ms:.0f} | {base / ms:.2f}x | | peak {peak:.1f} GiB |",
             {"what": "dit", "impl": impl, "ms": ms, "speedup": base / ms, "peak_gib": peak})
    sec.append("\nDense: TORCH_CUDNN (the attention call), TORCH_SDPA's dispatch (the DiT: cuDNN on Hopper). The SSTA "
               "rows include choosing the tiles and the tiling. Random weights: the tiles chosen are not a trained "
               "model's, but the window and the top-k fix the density, so the time is. The DiT's sparse rows are timed "
               "once, kernels warmed by the attention rows.")


def bench_vae() -> None:
    from diffusers import AutoencoderKLHunyuanVideo15

    from bench.weights_random import random_model
    from telefuser.models.hunyuan15.tiny import TINY_ARCH
    from telefuser.models.hunyuan15.vae import HunyuanVideo15VAE, HunyuanVideo15VAEConfig
    from telefuser.models.hunyuan15.vae_keys import tencent_to_diffusers

    SECTIONS.setdefault("vae", [
        "## VAE decode of the 480p 121-frame latent ([1, 32, 31, 30, 53]: 848x480)", "",
        "| implementation | mode | ms | x diffusers | rel. error vs ours (same mode) | peak GiB |",
        "|---|---|---|---|---|---|"])
    cfg = HunyuanVideo15VAEConfig(**TINY_ARCH["vae"]) if STATE["smoke"] else HunyuanVideo15VAEConfig()
    dev, dtype = STATE["device"], (torch.float32 if STATE["smoke"] else BF16)
    ours = random_model(lambda: HunyuanVideo15VAE(cfg), dev, dtype, seed=1)
    make = lambda: AutoencoderKLHunyuanVideo15(  # noqa: E731
        latent_channels=cfg.latent_channels, block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block, spatial_compression_ratio=cfg.spatial_ratio,
        temporal_compression_ratio=cfg.temporal_ratio, scaling_factor=cfg.scaling_factor)
    theirs = peer(make, tencent_to_diffusers(ours.state_dict())).to(dev)
    shape = (1, cfg.latent_channels, 3, 7, 7) if STATE["smoke"] else (1, 32, 31, 30, 53)
    z = torch.randn(shape, generator=torch.Generator(device=dev).manual_seed(5), device=dev).to(dtype)
    tile = (4, 4) if STATE["smoke"] else (16, 16)  # diffusers' default: 256-pixel tiles, 0.25 overlap
    for mode in ("whole", "tiled"):
        if left() < 120 and not STATE["smoke"]:
            emit("vae", f"| (skipped {mode}: {left():.0f} s of the budget left) | | | | | |")
            continue
        tiled = mode == "tiled"
        if tiled:
            px = tile[0] * cfg.spatial_ratio
            theirs.enable_tiling(tile_sample_min_height=px, tile_sample_min_width=px, tile_latent_min_height=tile[0],
                                 tile_latent_min_width=tile[1], tile_overlap_factor=0.25)
        rows = {}
        for name, fn in (("TeleFuser HunyuanVideo15VAE", lambda: ours.decode(z, tiled=tiled, tile_size=tile)),
                         ("diffusers AutoencoderKLHunyuanVideo15",
                          lambda: theirs.decode(z / cfg.scaling_factor).sample.clamp(-1, 1))):
            try:
                with torch.inference_mode():
                    rows[name] = timed(fn, warm=STATE["smoke"])  # one cold call each (~a minute at full size)
            except torch.OutOfMemoryError as exc:
                emit("vae", f"| {name} | {mode} | out of memory ({str(exc)[:80]}) | | | |")
        free()
        base = rows.get("diffusers AutoencoderKLHunyuanVideo15", (math.nan, 0, None))
        ours_out = rows.get("TeleFuser HunyuanVideo15VAE", (0, 0, None))[2]
        for name, (ms, peak, out) in rows.items():
            same = ours_out is not None and out.shape == ours_out.shape
            err = rel_err(out, ours_out) if same else math.nan
            emit("vae", f"| {name} | {mode} | {ms:.0f} | {ms / base[0]:.2f}x | {err:.2e} | {peak:.1f} |",
                 {"impl": name, "mode": mode, "ms": ms, "peak_gib": peak, "rel_err": err})
        rows.clear()


def bench_taehv() -> None:
    """taehv1_5's decoder (32 channels, 2x2 patch, the published widths; random weights) beside our full VAE, both on
    the 480p 121f latent, one warm call each: the preview decoder's speed-up."""
    from bench.weights_random import random_model
    from telefuser.models.hunyuan15.tiny import TINY_ARCH
    from telefuser.models.hunyuan15.vae import HunyuanVideo15VAE, HunyuanVideo15VAEConfig
    from telefuser.models.taehv.decoder import TAEHV, TAEHVConfig

    SECTIONS.setdefault("taehv", [
        "## Preview decode: taehv1_5 (TAEHV) against the VAE, 480p 121-frame latent ([1, 32, 31, 30, 53])", "",
        "| decoder | ms | speed | peak GiB |", "|---|---|---|---|"])
    smoke = STATE["smoke"]
    dev, dtype = STATE["device"], (torch.float32 if smoke else BF16)
    vae_cfg = HunyuanVideo15VAEConfig(**TINY_ARCH["vae"]) if smoke else HunyuanVideo15VAEConfig()
    tae_cfg = TAEHVConfig(z_dim=vae_cfg.latent_channels, patch_size=2, channels=[8, 8, 8, 8] if smoke else
                          [256, 128, 64, 64])
    shape = (1, vae_cfg.latent_channels, 3, 7, 7) if smoke else (1, 32, 31, 30, 53)
    z = torch.randn(shape, generator=torch.Generator(device=dev).manual_seed(5), device=dev).to(dtype)

    def decode_row(build, call) -> tuple[float, float, tuple[int, ...]]:
        model = random_model(build, dev, dtype, seed=1)  # freed with this frame
        with torch.inference_mode():
            ms, peak, out = timed(lambda: call(model))
        return ms, peak, tuple(out.shape)

    rows = {}
    for name, build, call in (
            ("TAEHV (taehv1_5 shapes), 4 latent frames per call", lambda: TAEHV(tae_cfg),
             lambda m: m.decode(z, chunk_frames=4)),
            ("TeleFuser HunyuanVideo15VAE, whole", lambda: HunyuanVideo15VAE(vae_cfg), lambda m: m.decode(z))):
        rows[name] = decode_row(build, call)
        free()
    base = rows["TeleFuser HunyuanVideo15VAE, whole"][0]
    for name, (ms, peak, out_shape) in rows.items():
        emit("taehv", f"| {name} | {ms:.0f} | {base / ms:.1f}x the VAE's speed | {peak:.1f} |",
             {"decoder": name, "ms": ms, "peak_gib": peak, "frames": list(out_shape)})


def bench_sr() -> None:
    from bench.weights_random import random_model
    from telefuser.models.hunyuan15.sr import (SRUpsampler720p, SRUpsampler720pConfig, meanflow_t_r,
                                               noise_lq_latent, sr_condition, sr_condition_for, upsample_lq_latent)
    from telefuser.models.hunyuan15.tiny import TINY_ARCH
    from telefuser.ops.dispatch import use_dispatch
    from telefuser.runtime.stages.hy15_denoise import hy15_sigmas

    SECTIONS.setdefault("sr", [
        "## SR stage 480p -> 720p, 121 frames (upsampler + 6 MeanFlow Euler steps of the SR DiT)", "",
        "| attention | upsample ms | s / step | stage s | peak GiB |", "|---|---|---|---|---|"])
    if left() < 200 and not STATE["smoke"]:
        emit("sr", f"| (skipped: {left():.0f} s of the budget left) | | | | |")
        return
    dev, smoke = STATE["device"], STATE["smoke"]
    dtype = torch.float32 if smoke else BF16
    cfg = dit_config(sr=True)
    dit = our_dit(cfg, dtype)
    up_cfg = SRUpsampler720pConfig(**TINY_ARCH["upsampler_720p"]) if smoke else SRUpsampler720pConfig()
    upsampler = random_model(lambda: SRUpsampler720p(up_cfg), dev, torch.float32, seed=2)  # float32, as published
    gen = torch.Generator(device=dev).manual_seed(4)
    lq = torch.randn((1, cfg.out_channels, 2, 2, 3) if smoke else (1, 32, 31, 30, 53), generator=gen, device=dev)
    size = (4, 6) if smoke else (45, 80)
    cond = text_branches(dit_config(), dtype, gen)[0]
    steps = 2 if smoke else 6
    sigmas = hy15_sigmas(steps, 2.0)
    timesteps = (sigmas[:-1] * 1000.0).tolist()
    for impl in ("TORCH_SDPA", "SAGE_ATTN_2_8_8"):
        free()
        with torch.inference_mode(), use_dispatch(kernel_table(impl, sr=True)):
            start = time.perf_counter()
            up = upsample_lq_latent(lq, size, upsampler).float()
            if cuda():
                torch.cuda.synchronize()
            up_ms = (time.perf_counter() - start) * 1e3
            latents = torch.randn(up.shape, generator=gen, device=dev)
            condition, zero = sr_condition(latents, noise_lq_latent(up, 0.7, noise=torch.randn_like(up)))
            start = time.perf_counter()
            for i in range(steps):  # hy15_sr's loop
                t = (sigmas[i] * 1000.0).reshape(1).to(dev)
                y = sr_condition_for(timesteps[i], condition, zero, 0.7).to(dtype)
                t_r = torch.tensor([meanflow_t_r(timesteps, i)], dtype=torch.float32, device=dev)
                v = dit(latents.to(dtype), t, *cond, None, y=y, t_r=t_r).float()
                latents = latents + (sigmas[i + 1] - sigmas[i]).to(dev) * v
            if cuda():
                torch.cuda.synchronize()
            loop = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda() else 0.0
        emit("sr", f"| {impl} | {up_ms:.0f} | {loop / steps:.2f} | {loop + up_ms / 1e3:.1f} | {peak:.1f} |",
             {"attention": impl, "upsample_ms": up_ms, "s_per_step": loop / steps, "stage_s": loop + up_ms / 1e3,
              "peak_gib": peak})
        if left() < 200 and not smoke:
            break
    del dit, upsampler
    free()


PLAN_FILES = ("transformer/480p_t2v", "transformer/720p_sr_distilled", "vae", "upsampler/720p_sr_distilled",
              "text_encoder/llm")


def randomize_files(root: Path) -> None:
    """Fill the recipe's header-only safetensors files (bench/hy15_files' layout) with random values (`random_value`),
    file by file; the others stay sparse headers (the compiler reads only the recipe's)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bench.weights_random import random_value

    gen = torch.Generator(device=STATE["device"]).manual_seed(0)
    for path in sorted(p for folder in PLAN_FILES for p in (root / folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:  # header only: shapes and dtypes
            names = list(f.keys())
            metas = {n: f.get_slice(n) for n in names}
            spec = {n: (metas[n].get_shape(), metas[n].get_dtype()) for n in names}
        dt = {"BF16": BF16, "F32": torch.float32}
        state = {n: random_value(n, torch.Size(s), dt[d], STATE["device"], gen).cpu() for n, (s, d) in spec.items()}
        save_file(state, str(path))
        del state
        log(f"wrote {path} ({path.stat().st_size / 2**30:.1f} GiB)")


def bench_plan(root: Path) -> None:
    from bench.hy15_files import write_hunyuan15_root

    SECTIONS.setdefault("plan", ["## 480p T2V + SR to 720p through the compiled plan (random weights on disk)", "",
                                 "| recipe | steps | wall s (load excluded) | denoise s | peak GiB | estimate GiB | "
                                 "peak / estimate |", "|---|---|---|---|---|---|---|"])
    repo = Path(__file__).resolve().parents[1]
    # the estimate does not depend on the step counts: 4 base + 2 SR steps keep the run inside one device call
    overrides = ["--set", "layer2.num_inference_steps=4", "--set", "layer2.sr_config.num_inference_steps=2"]
    if not STATE["smoke"]:  # the smoke run: the embedded tiny SR set, the same compile -> load_plan -> run logic
        if not (root / "done").is_file():
            randomize_files(write_hunyuan15_root(root))
            (root / "done").write_text("ok")
            if left() < 360:  # the files stay on the warm machine: the run is the next call's
                emit("plan", f"| files written under {root}, {left():.0f} s left: run `--part plan` again "
                             "| | | | | | |")
                return
        os.environ["TELEFUSER_MODEL_ROOT"] = str(root)
    # the H100 plan, then the one compiled for a 24 GiB GPU (block-streamed encoders and DiTs) on the same files
    recipes = [repo / "recipes" / "tiny_hy15_sr.toml"] if STATE["smoke"] else [
        repo / "recipes" / f"hunyuan15_t2v_480p_sr_720p{suffix}.toml" for suffix in ("", "_24gib")]
    for recipe in recipes:
        if left() < 150:
            emit("plan", f"| {recipe.name}: skipped, {left():.0f} s of the budget left | | | | | | |")
            continue
        run_plan(recipe, overrides)


def run_plan(recipe: Path, overrides: list[str]) -> None:
    import telefuser
    from telefuser.cli.compile import main as compile_main

    out = Path(os.environ.get("OUT", "bench_out"))
    plan = out / f"{recipe.stem}.plan.json"
    assert compile_main([str(recipe), "-o", str(plan), *overrides]) == 0
    estimate = json.loads(plan.read_text())["memory"]["peak_bytes"] / 2**30
    pipe = telefuser.load_plan(str(plan), verify_weights=False)  # the fingerprints are checked; no 50 GB re-hash
    start = time.perf_counter()
    video = pipe.run(prompt='a neon shop sign that reads "OPEN" in the rain', seed=7, progress=False)
    wall = time.perf_counter() - start
    timings = video.timings
    peak = (timings.peak_memory_bytes or 0) / 2**30
    denoise = sum(timings.steps)
    emit("plan", f"| {recipe.name} ({', '.join(overrides[1::2])}) | {len(timings.steps)} | {wall:.1f} | "
                 f"{denoise:.1f} | {peak:.1f} | {estimate:.1f} | {peak / estimate:.2f} |",
         {"recipe": recipe.name, "wall_s": wall, "denoise_s": denoise, "peak_gib": peak, "estimate_gib": estimate,
          "peak_kind": timings.peak_memory_kind, "summary": timings.summary()})
    note = (f"\nTarget: peak within 15% of the plan's estimate (the peak counts what {timings.peak_memory_kind} "
            "reports); the _24gib plan's peak within 24 GiB.")
    if note not in SECTIONS["plan"]:
        SECTIONS["plan"].append(note)
    del pipe, video
    free()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("dit", "vae", "sr", "ssta", "taehv", "plan", "all"), nargs="+",
                        default=["all"],
                        help="`all` is dit, vae, sr and ssta; `plan` writes ~50 GB of random weights under --root")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting new rows past this")
    parser.add_argument("--root", type=Path, default=Path("/tmp/hy15_random"), help="where `plan` writes weights")
    parser.add_argument("--cpu-smoke", action="store_true", help="every part at tiny sizes on the CPU")
    args = parser.parse_args(argv)
    STATE.update(device="cpu" if args.cpu_smoke else "cuda", smoke=args.cpu_smoke,
                 deadline=time.monotonic() + args.budget_s)
    import diffusers

    from bench.common import environment

    where = "CPU smoke run, tiny sizes" if args.cpu_smoke else environment()
    STATE["header"] = f"{where}, diffusers {diffusers.__version__}"
    parts = set(args.part)
    if "all" in parts:  # the smoke run's `all` includes `plan` (tiny files, nothing large written)
        parts = (parts - {"all"}) | {"dit", "vae", "sr", "ssta", "taehv"} | ({"plan"} if args.cpu_smoke else set())
    for name, fn in (("dit", bench_dit), ("vae", bench_vae), ("sr", bench_sr), ("ssta", bench_ssta),
                     ("taehv", bench_taehv),
                     ("plan", lambda: bench_plan(args.root))):
        if name in parts:
            try:
                fn()
                free()  # the part's models are gone with its frame
            except Exception as exc:  # noqa: BLE001 (keep the other parts' rows)
                SECTIONS.setdefault(name, []).append(f"\n{name} failed: {type(exc).__name__}: {str(exc)[:300]}")
                log(f"{name} failed: {exc!r}")
                if args.cpu_smoke:
                    raise
    print(write_outputs())


if __name__ == "__main__":
    main()
