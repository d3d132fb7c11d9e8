"""Quantised attention on one GPU: our SageAttention2-style Triton kernel against cuDNN and FlashAttention-2.

Part `kernels`: self-attention alone at Wan2.1-1.3B 480p 81f ([1, 32760, 12, 128]) and Wan2.1-14B 720p 81f
([1, 75600, 40, 128]), bf16, BSND as the DiT passes it; for each quantised variant a sweep of block sizes and
schedules (the best is what the kernel's `TUNED` table then records); TOPS counted as 4 B N S^2 D / time;
relative L2 error and cosine similarity against float64 attention over 512 random query rows (all keys).
The `sageattention` package is measured too where it is installed (carried as a wheel).
Part `steps` (and `i2v`, the same for Wan2.1 I2V-14B 480p): one CFG denoising step (two batch-1 forwards, the runtime's `guided`) of the full-size random
Wan2.1-1.3B DiT at 480p 81f with exact attention and each quantised variant, beside diffusers'
WanTransformer3DModel on the same weights; the relative error of each step's output against our exact step.
Part `video`: a 50-step 1.3B 480p plan run end to end with exact and with SAGE_ATTN_2_8_8 attention (random
weights written to disk, compiled with --set), wall time and per-frame PSNR between the two videos.

Run on the device: `PYTHONPATH=. python3 bench/attention.py [--part kernels|steps|all] [--cpu-smoke]`;
writes $OUT/attention.md and $OUT/attention.json, prints the tables last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from telefuser.kernels.triton import sage_attention as sage
from telefuser.kernels.triton.sage_attention import KernelConfig, sage_attention

BF16 = torch.bfloat16
SHAPES = {"Wan2.1-1.3B 480p 81f": (1, 32760, 12, 128), "Wan2.1-14B 720p 81f": (1, 75600, 40, 128)}
VARIANTS = {  # label -> (pv_fp8, qk_fp8)
    "SAGE_ATTN_2_8_8 (INT8 QK, FP8 PV)": (True, False),
    "SAGE_ATTN_2_8_16 (INT8 QK, bf16 PV)": (False, False),
    "FP8 QK, FP8 PV (not shipped: QK error)": (True, True),
}
SWEEP = ([KernelConfig(bm, bn, w, st, tma) for bm, bn, w, st, tma in
          ((64, 128, 4, 3, False), (64, 128, 4, 3, True), (64, 128, 4, 2, True), (128, 64, 4, 3, False))]
         + [KernelConfig(bm, bn, w, st, tma, two_tiles=True) for bm, bn, w, st, tma in
            ((128, 128, 4, 3, False), (128, 128, 4, 2, False), (128, 64, 4, 3, False), (128, 128, 8, 3, False),
             (128, 128, 4, 3, True), (128, 64, 4, 3, True))])
REF_ROWS = 512
RESULTS: dict = {"kernels": [], "steps": []}


def log(message: str) -> None:
    print(f"[attention {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_ms(fn: Callable[[], object], smoke: bool) -> float:
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median")


def reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """float64 attention of the selected query rows over all keys, BSND -> [B, rows, N, D]."""
    out = []
    for h in range(q.shape[2]):
        qh = q[:, rows, h].double()
        s = qh @ k[:, :, h].double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        out.append(torch.softmax(s, dim=-1) @ v[:, :, h].double())
    return torch.stack(out, dim=2)


def errors(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> tuple[float, float]:
    got = out[:, rows].double()
    rel = ((got - ref).norm() / ref.norm()).item()
    cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    return rel, cos


def kernel_rows(lines: list[str], shape_name: str, shape: tuple[int, int, int, int], first: bool, smoke: bool,
                sageattention) -> None:
    """One shape's rows of `bench_kernels` (its tensors go with this frame)."""
    b, s, n, d = shape
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(b, s, n, d, generator=gen, device=DEVICE, dtype=BF16) for _ in range(3))
    rows = torch.randperm(s, generator=torch.Generator().manual_seed(1))[:REF_ROWS].to(DEVICE)
    ref = reference_rows(q, k, v, rows)
    ops = 4 * b * n * s * s * d
    baseline = None

    def record(impl: str, cfg: str, fn: Callable[[], torch.Tensor]) -> float:
        nonlocal baseline
        ms = bench_ms(fn, smoke)
        rel, cos = errors(fn(), ref, rows)
        baseline = baseline or ms
        tops = ops / ms / 1e9
        RESULTS["kernels"].append({"shape": shape_name, "impl": impl, "config": cfg, "ms": ms, "tops": tops,
                                   "rel_err": rel, "cos": cos})
        lines.append(f"| {shape_name} [{b}, {s}, {n}, {d}] | {impl} | {cfg} | {ms:.2f} | {tops:.0f} | "
                     f"{baseline / ms:.2f}x | {rel:.2e} | {cos:.6f} |")
        log(lines[-1])
        return ms

    bnsd = [t.transpose(1, 2) for t in (q, k, v)]
    if smoke:
        record("SDPA (CPU)", "", lambda: F.scaled_dot_product_attention(*bnsd).transpose(1, 2))
    else:
        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(*bnsd).transpose(1, 2)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(*bnsd).transpose(1, 2)

        record("cuDNN (SDPA)", "bf16", cudnn)
        record("FlashAttention-2 (SDPA flash)", "bf16", flash)
        if sageattention is not None:
            from sageattention import sageattn

            record(f"sageattention {getattr(sageattention, '__version__', '')} sageattn", "package default",
                   lambda: sageattn(q, k, v, tensor_layout="NHD", is_causal=False))
    for label, (pv_fp8, qk_fp8) in VARIANTS.items():
        configs = (SWEEP if first and not smoke else [None])
        best = (math.inf, None)
        for cfg in configs:
            call = (lambda c=cfg: sage_attention(q, k, v, pv_fp8=pv_fp8, qk_fp8=qk_fp8, config=c))
            try:
                call()
                ms = bench_ms(call, smoke)
            except Exception as exc:  # a config the compiler rejects (shared memory, TMA) is skipped
                log(f"{label} {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            RESULTS["kernels"].append({"shape": shape_name, "impl": label, "config": str(cfg), "ms": ms,
                                       "tops": ops / ms / 1e9, "sweep": True})
            log(f"sweep {label} {cfg}: {ms:.2f} ms, {ops / ms / 1e9:.0f} TOPS")
            best = min(best, (ms, cfg), key=lambda t: t[0])
        cfg = best[1]
        if first and not smoke and not qk_fp8 and cfg is not None:  # what the steps part then runs
            sage.TUNED[(torch.cuda.get_device_capability(), pv_fp8)] = cfg
        record(label, str(cfg) if cfg else "default",
               lambda: sage_attention(q, k, v, pv_fp8=pv_fp8, qk_fp8=qk_fp8, config=cfg))
    # the pre-pass alone (quantise q, k, v) at the default config, for its share of the call
    quant_ms = bench_ms(lambda: sage_attention(q, k[:, :1], v[:, :1], pv_fp8=True), smoke)
    lines.append(f"| {shape_name} | quantisation pre-pass + 1-key attention (an upper bound of the pre-pass) | "
                 f"| {quant_ms:.3f} | | | | |")


def bench_kernels(smoke: bool) -> list[str]:
    lines = ["| shape | implementation | config | ms | TOPS | x cuDNN | rel. error vs fp64 | cosine |", "|---|---|---|---|---|---|---|---|"]
    shapes = {"smoke": (1, 300, 2, 64)} if smoke else SHAPES
    try:
        import sageattention  # noqa: F401  (a peer, measured where carried)
    except ImportError:
        sageattention = None
    for shape_name, shape in shapes.items():
        kernel_rows(lines, shape_name, shape, shape_name == next(iter(shapes)), smoke, sageattention)
        free()
    return lines


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_steps(smoke: bool, model: str) -> list[str]:
    """One CFG step (two batch-1 forwards, the runtime's `guided`): exact and quantised attention (ours),
    diffusers (SDPA default, cuDNN) on the same weights. Errors against our exact step, of the conditional
    forward alone and of the guided output (CFG 5 amplifies the small cond - uncond difference)."""
    from bench.common import TRITON_ROWS
    from bench.wan_i2v import diffusers_dit
    from bench.weights_random import wan_step_inputs
    from telefuser.distributed.rank import RankContext
    from telefuser.models.tiny import TINY_ARCH
    from telefuser.models.wan.dit import WAN21_1_3B, WAN21_14B, WanDiTConfig
    from telefuser.models.wan.dit_keys import wan_to_diffusers
    from telefuser.ops.dispatch import use_dispatch
    from telefuser.runtime.stages.denoise import guided

    i2v = model == "i2v"
    if smoke:
        cfg = WanDiTConfig(**{**TINY_ARCH["dit_i2v" if i2v else "dit"], "dim": 128, "num_heads": 2})
    else:
        cfg = WanDiTConfig(**{**WAN21_14B.__dict__, "model_type": "i2v", "in_dim": 36}) if i2v else WAN21_1_3B
    dtype = torch.float32 if smoke else BF16
    latent = (1, 16, 3, 8, 12) if smoke else (1, 16, 21, 60, 104)
    text_len, scale = (16, 5.0) if smoke else (512, 5.0)
    ours, x, t, context, context_null, gen = wan_step_inputs(cfg, latent, text_len, DEVICE, dtype)
    extra = {}
    if i2v:  # Wan2.1 I2V: mask + first-frame latent (20 channels) and 257 CLIP tokens
        extra = {"y": torch.randn(1, 20, *latent[2:], generator=gen, device=DEVICE).to(dtype),
                 "clip_fea": torch.randn(1, 257, cfg.image_dim, generator=gen, device=DEVICE).to(dtype)}
    rank = RankContext(device=torch.device(DEVICE))
    kernels = {} if smoke else TRITON_ROWS
    lines = ["| implementation | ms / step | x diffusers | x our exact | cond forward rel. error vs our exact | "
             "CFG step rel. error vs our exact | peak GiB |", "|---|---|---|---|---|---|---|"]
    rows = {}
    exact = None
    runs = 1 if smoke else (2 if i2v else 3)
    single_tile = KernelConfig(block_m=64, block_n=128, num_warps=4, num_stages=3, use_tma=False)
    for label in ("TORCH_SDPA", "SAGE_ATTN_2_8_16", "SAGE_ATTN_2_8_8", "SAGE_ATTN_2_8_8_SM90",
                  "SAGE_ATTN_2_8_8, one tile per program"):
        impl = label.split(",")[0]
        table = {"attention": impl, **kernels}
        saved = dict(sage.TUNED)
        if label.endswith("one tile per program") and DEVICE == "cuda":
            sage.TUNED[(torch.cuda.get_device_capability(), True)] = single_tile

        def step(table=table, model=ours) -> torch.Tensor:
            with torch.inference_mode(), use_dispatch(table):
                return guided(model, x, t, context, context_null, scale, rank, extra)

        with torch.inference_mode(), use_dispatch(table):
            cond = ours(x, t, context, **extra).float()
        free()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = step()
        ms = wall_ms(step, runs)
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
        sage.TUNED.clear()
        sage.TUNED.update(saved)
        exact = exact or (cond, out)
        rows[label] = (ms, rel_err(cond, exact[0]), rel_err(out, exact[1]), peak)
        log(f"{model} step {label}: {rows[label]}")
    state = wan_to_diffusers(ours.state_dict())
    del ours, step  # the last step closure holds the model too
    free()
    theirs_ms = math.nan
    if not smoke:
        from bench.wan_i2v import Setup, peer_model

        ref = peer_model(diffusers_dit(cfg), state, Setup(smoke=False))
        del state
        free()
        image = {"encoder_hidden_states_image": extra["clip_fea"]} if i2v else {}
        model_in = torch.cat([x, extra["y"]], dim=1) if i2v else x

        def forward(ctx: torch.Tensor, branch: str) -> torch.Tensor:
            with ref.cache_context(branch):
                return ref(hidden_states=model_in, timestep=t, encoder_hidden_states=ctx, return_dict=False,
                           **image)[0].float()

        def theirs() -> torch.Tensor:
            with torch.inference_mode():
                cond, uncond = forward(context, "cond"), forward(context_null, "uncond")
            return uncond + scale * (cond - uncond)

        with torch.inference_mode():
            cond = forward(context, "cond")
        torch.cuda.reset_peak_memory_stats()
        out = theirs()
        theirs_ms = wall_ms(theirs, runs)
        rows["diffusers WanTransformer3DModel (SDPA default: cuDNN)"] = (
            theirs_ms, rel_err(cond, exact[0]), rel_err(out, exact[1]), torch.cuda.max_memory_allocated() / 2**30)
        del ref
        free()
    exact_ms = rows["TORCH_SDPA"][0]
    for name, (ms, cond_err, step_err, peak) in rows.items():
        label = f"TeleFuser WanDiT, attention {name}" if name == "TORCH_SDPA" or name.startswith("SAGE") else name
        RESULTS["steps"].append({"model": model, "impl": name, "ms": ms, "cond_rel_err": cond_err,
                                 "step_rel_err": step_err, "peak_gib": peak})
        lines.append(f"| {label} | {ms:.0f} | {ms / theirs_ms:.2f}x | {ms / exact_ms:.2f}x | {cond_err:.2e} | "
                     f"{step_err:.2e} | {peak:.1f} |")
    return lines


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench_video(smoke: bool) -> list[str]:
    """A 50-step Wan2.1-1.3B 480p 81f video through the compiled plan, exact against SAGE_ATTN_2_8_8 attention."""
    import numpy as np

    import telefuser
    from bench.common import compile_shipped, target_overrides
    from bench.wan21_run import ROOT, write_files

    if smoke:
        return ["(no video in the CPU smoke run)"]
    paths = write_files(ROOT)
    videos, lines = {}, ["| attention | wall s (load excluded) | denoise s | s / step |", "|---|---|---|---|"]
    for impl in ("TORCH_SDPA", "SAGE_ATTN_2_8_8"):
        plan = compile_shipped("wan21_t2v_1.3b", ROOT / f"plan_{impl}.json", paths,
                               [*target_overrides(False), "layer2.num_inference_steps=50",
                                f"layer2.models.dit.attention_config.attn_impl={impl}"])
        pipe = telefuser.load_plan(str(plan))
        start = time.perf_counter()
        video = pipe.run(prompt="a red fox running through fresh snow", seed=7, progress=False)
        wall = time.perf_counter() - start
        log(video.timings.summary())
        denoise = sum(video.timings.steps)
        videos[impl] = np.asarray(video.frames)
        lines.append(f"| {impl} | {wall:.1f} | {denoise:.1f} | {denoise / 50:.3f} |")
        del pipe, video
        free()
    a, b = (v.astype(np.float64) for v in videos.values())
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))
    RESULTS["video"] = {"psnr_per_frame": psnr.tolist()}
    lines += ["", f"Per-frame PSNR, SAGE_ATTN_2_8_8 video against the exact one (same seed, random weights): "
                  f"mean {psnr.mean():.1f} dB, min {psnr.min():.1f}, max {psnr.max():.1f} over {len(psnr)} frames."]
    return lines


def wall_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("kernels", "steps", "i2v", "video", "all"), nargs="+", default=["all"])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (checks the logic)")
    args = parser.parse_args(argv)
    DEVICE = "cpu" if args.cpu_smoke else "cuda"
    from bench.common import environment, out_dir

    header = environment() if DEVICE == "cuda" else "CPU smoke run"
    sections = [f"# Quantised attention ({header})", ""]
    parts = set(args.part)
    if parts & {"kernels", "all"}:
        sections += ["## Attention alone", "", *bench_kernels(args.cpu_smoke), ""]
        sections.append(f"Kernel configs after the sweep: {dict((str(k), str(v)) for k, v in sage.TUNED.items())}")
    if parts & {"steps", "all"}:
        sections += ["", "## One CFG step of Wan2.1-1.3B 480p 81f", "", *bench_steps(args.cpu_smoke, "t2v"), ""]
    if parts & {"i2v", "all"}:
        sections += ["", "## One CFG step of Wan2.1 I2V-14B 480p 81f", "", *bench_steps(args.cpu_smoke, "i2v"), ""]
    if parts & {"video", "all"}:
        sections += ["", "## A 50-step Wan2.1-1.3B 480p 81f video", "", *bench_video(args.cpu_smoke), ""]
    text = "\n".join(sections)
    out = out_dir()
    (out / "attention.md").write_text(text + "\n")
    (out / "attention.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print(text)


DEVICE = "cuda"

if __name__ == "__main__":
    main()
