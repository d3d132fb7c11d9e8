"""Step caches (issue 25) on one GPU: our `feature_cache_config` beside cache-dit, same weights, same call.

A 50-step Wan2.1-1.3B T2V video, 480p 16:9, 81 frames, UniPC, CFG 5.0, full-size random bf16 weights written once
under $WAN_RANDOM_ROOT (default /tmp/wan21_cache) in diffusers' folder layout (bench/weights_random.py), which our
compiler reads too, so both sides load the same files.

1. Like with like, one static schedule (`schedule(n)`: the first and last n//10 steps compute, the steps between
   alternate compute / reuse starting with compute; at 50 steps 30 computed, 20 reused = 40%:
   reused 6, 8, ..., 44):
   - ours: plans compiled with `--set layer2.models.dit.feature_cache_config.method=static` and `.compute_steps=[..]`,
     run through `telefuser.load_plan(plan).run(...)`, against the same plan without the cache;
   - cache-dit (1.5.x, on diffusers' WanPipeline): `cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
     Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=n, steps_computation_mask=[1/0 per step],
     steps_computation_policy="static"))`, removed with `cache_dit.disable_cache(pipe)`, against the same pipe
     uncached. Steps computed are counted by a pre-hook on the last transformer block (and cache-dit's own
     `cache_dit.summary(pipe)` where it answers).
2. The probe: our first_block cache at threshold 0 (bit-identical to no cache: its PSNR must be inf) measures per
   DiT call (a) first_block's rel L1 of block 0's residual against the previous step's and (b) TeaCache's rescaled
   distance poly(rel L1 of the time embedding) with the published Wan2.1 T2V 1.3B fit. Threshold rule, both
   methods: 1.5 x the median per-step value (both reference the last *computed* step, so after one reuse the
   distance is ~2 steps' worth: with even steps this reuses about every other step). The probe also times each
   check (synchronised, both branches) against the uncached run's mean step: "our cache's overhead per step".
3. Adaptive rows at those thresholds: teacache, first_block (Fn 1), taylorseer (no threshold: interval 2,
   order 1); each with the schedule's first n//10 steps as warm-up; and cache-dit's DBCache F1B0 at the same
   threshold as our first_block.

Each row: wall time (denoise = sum of the step times; video = whole call), steps computed per branch, per-frame
PSNR (frames in [0, 1]) against its own side's uncached video. `--budget-s` (default 560): a run that would not fit
is skipped with its reason; $OUT/cache.md and cache.json are rewritten after every row (partial results kept).
Estimated on an H200 (not yet run): weights ~1.5 min once, ~1.5-2 min per 50-step video on each side, so all rows
need about 15 min: in one 10-minute call the static comparison (both sides) comes first and the adaptive rows are
cut by the budget; a second call on the warm machine with `--parts adaptive` (weights reused) gives them.
Denoise time on the diffusers side: the step times from the second step on (step-end callbacks), the first step
counted as their mean (its callback interval would include text encoding). cache-dit with Fn 1 still runs block
0 on its reused steps; ours static reuses the whole stack.

GPU: `PYTHONPATH=. python3 bench/cache.py` (carry the wheels: see docs/sparse_and_caches.md).
CPU check of our side on the tiny plan (recipes/tiny.toml, 4 steps; cache-dit rows skipped):
`python bench/cache.py --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import compile_shipped, free, out_dir, size_overrides, sync, target_overrides

CACHE = "layer2.models.dit.feature_cache_config"
PROMPT, SEED = "a red fox running through fresh snow", 7
START = time.perf_counter()


def schedule(n: int) -> list[int]:
    """The static schedule's computed steps (0-based): the first and last n//10 (at least 1 first), the rest alternate."""
    edge = max(1, n // 10)
    middle = [s for s in range(edge, n - n // 10) if (s - edge) % 2 == 0]
    return sorted(set(range(edge)) | set(middle) | set(range(n - n // 10, n)))


def psnr(frames: np.ndarray, ref: np.ndarray) -> list[float]:
    """Per-frame PSNR (dB) of [F, H, W, 3] frames in [0, 1] (uint8 scaled); inf where equal."""
    a, b = (np.asarray(f, dtype=np.float64) / (255.0 if f.dtype == np.uint8 else 1.0) for f in (frames, ref))
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    return [float("inf") if m == 0 else 10 * math.log10(1.0 / m) for m in mse]


class Report:
    def __init__(self, args) -> None:
        self.args, self.rows, self.notes, self.skipped, self.probe = args, [], [], [], {}
        self.head = environment(args.cpu_smoke)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - START)

    def fits(self, name: str, need: float) -> bool:
        if self.left() >= need:
            return True
        self.skipped.append(f"{name}: skipped, {self.left():.0f} s of the budget left, ~{need:.0f} s needed")
        print(self.skipped[-1], flush=True)
        return False

    def add(self, side: str, name: str, setting: str, video_s: float, steps: list[float], computed, frames, ref) -> None:
        p = psnr(frames, ref) if ref is not None else []
        finite = [x for x in p if math.isfinite(x)]
        self.rows.append({"side": side, "run": name, "setting": setting, "video_s": video_s, "denoise_s": sum(steps),
                          "steps": len(steps), "computed": computed,
                          "psnr_mean": statistics.mean(finite) if finite else (float("inf") if p else None),
                          "psnr_min": min(p) if p else None, "psnr_per_frame": p})
        print(f"[{time.perf_counter() - START:6.0f} s] {side} {name}: video {video_s:.2f} s, computed {computed}",
              flush=True)
        self.write()

    def table(self) -> str:
        n = self.args.steps
        lines = [f"Measured: {self.head}.", "",
                 f"Wan2.1-1.3B T2V, {self.args.label}, {n} UniPC steps, CFG 5.0, seed {SEED}. Static schedule, computed "
                 f"steps: {schedule(n)} (reused: {[s for s in range(n) if s not in schedule(n)]}).", "",
                 "| side | run | setting | video s | denoise s | x uncached (denoise) | computed per branch | "
                 "PSNR mean / min dB vs own uncached |", "|---|---|---|---|---|---|---|---|"]
        base = {r["side"]: r["denoise_s"] for r in self.rows if r["run"] == "uncached"}
        for r in self.rows:
            speed = base.get(r["side"], 0) / r["denoise_s"] if r["denoise_s"] else 0
            ps = "" if r["psnr_mean"] is None else f"{r['psnr_mean']:.2f} / {r['psnr_min']:.2f}"
            lines.append(f"| {r['side']} | {r['run']} | {r['setting']} | {r['video_s']:.2f} | {r['denoise_s']:.2f} | "
                         f"{speed:.2f}x | {r['computed']} | {ps} |")
        return "\n".join(lines + [""] + [f"- {x}" for x in self.notes + self.skipped])

    def write(self) -> None:
        out = out_dir()
        for name, text in (("cache.md", self.table() + "\n"),
                           ("cache.json", json.dumps({"environment": self.head, "rows": self.rows, "probe": self.probe,
                                                      "notes": self.notes, "skipped": self.skipped}, indent=1))):
            tmp = out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, out / name)


def environment(smoke: bool) -> str:
    import datetime
    import platform

    versions = f"PyTorch {torch.__version__}, Python {platform.python_version()}, {datetime.date.today().isoformat()}"
    for pkg in ("diffusers", "cache_dit"):
        try:
            versions += f", {pkg} {__import__(pkg).__version__}"
        except Exception:  # noqa: BLE001 - absent or without a version: said so
            versions += f", {pkg} absent"
    if smoke or not torch.cuda.is_available():
        return f"CPU smoke (tiny plan), {versions}"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, {versions}"


# ---------------------------------------------------------------------------------------------- ours

@contextlib.contextmanager
def probed(report: Report):
    """Every StepCache the runtime attaches measures first_block's and TeaCache's per-call distances and times them."""
    import telefuser.runtime.caches as caches
    from telefuser.runtime.caches.base import relative_l1
    from telefuser.runtime.caches.teacache import WAN21_COEFFICIENTS, polyval

    original, fit = caches.apply_step_cache, WAN21_COEFFICIENTS["wan2.1_t2v_1.3b"]
    rec = report.probe.setdefault("values", {"first_block": [], "teacache": [], "first_block_check_s": [],
                                             "teacache_check_s": []})

    def attach(dit, *args, **kwargs):
        cache, previous = original(dit, *args, **kwargs), {}
        decide = cache.policy.decide

        def measuring(c, ctx, x, forced):
            last = ctx.state.policy.get("first_residual")
            sync()
            t0 = time.perf_counter()
            value = relative_l1(x - ctx.first_input, last) if last is not None else None  # first_block's check
            t1 = time.perf_counter()
            inp = c.dit.time_embeddings(ctx.t)[0]  # TeaCache's check
            old = previous.get(ctx.branch)
            tc = polyval(fit, relative_l1(inp, old)) if old is not None else None
            t2 = time.perf_counter()
            previous[ctx.branch] = inp
            if value is not None:
                rec["first_block"].append(value)
                rec["first_block_check_s"].append(t1 - t0)
            if tc is not None:
                rec["teacache"].append(tc)
                rec["teacache_check_s"].append(t2 - t1)
            return decide(c, ctx, x, forced)

        cache.policy.decide = measuring
        return cache

    caches.apply_step_cache = attach
    try:
        yield rec
    finally:
        caches.apply_step_cache = original


class Ours:
    def __init__(self, args, paths: dict) -> None:
        self.args, self.paths, self.work = args, paths, Path(args.root) / "plans"
        self.work.mkdir(parents=True, exist_ok=True)
        if args.cpu_smoke:
            self.recipe, self.base = "tiny", [*target_overrides(True), f"layer2.num_inference_steps={args.steps}"]
        else:
            self.recipe = "wan21_t2v_1.3b"
            self.base = [*target_overrides(False), *size_overrides(81, 512, "480p", args.steps),
                         "layer3.aspect_ratio.default=16:9"]

    def run(self, name: str, sets: list[str], probe: Report | None = None):
        import telefuser

        plan = compile_shipped(self.recipe, self.work / f"{name}.json", self.paths, [*self.base, *sets])
        pipe = telefuser.load_plan(str(plan))
        with probed(probe) if probe else contextlib.nullcontext():
            sync()
            start = time.perf_counter()
            video = pipe.run(prompt=PROMPT, seed=SEED, progress=False)
            sync()
            wall = time.perf_counter() - start
        del pipe
        free()
        cached = video.timings.step_cache.get("dit", {})
        computed = {b: v["computed"] for b, v in cached.items()} or {"cond": len(video.timings.steps),
                                                                    "uncond": len(video.timings.steps)}
        return wall, list(video.timings.steps), computed, video.frames


def ours_rows(report: Report, ours: Ours, phase: str) -> None:
    args, n = report.args, report.args.steps
    need = lambda: report.probe.get("video_s", 60.0) * 1.2 + 30  # noqa: E731 - a video and a plan's load
    warm = [f"{CACHE}.warmup_steps={max(1, n // 10)}"]
    if phase == "static":
        if not args.cpu_smoke and report.fits("ours warm-up", 120):
            ours.run("warmup", ["layer2.num_inference_steps=2", "layer2.num_frames=17"])  # JIT, allocator
        if not report.fits("ours uncached", 10 if report.args.cpu_smoke else 150):
            return
        wall, steps, computed, frames = ours.run("uncached", [])
        report.probe["video_s"], report.probe["step_s"] = wall, statistics.mean(steps)
        report.ref_ours = frames
        report.add("ours", "uncached", "no feature_cache_config", wall, steps, computed, frames, frames)
        if "static" in report.args.parts.split(",") and report.fits("ours static", need()):
            sets = [f"{CACHE}.method=static", f"{CACHE}.compute_steps={schedule(n)}"]
            report.add("ours", "static", "method=static, compute_steps above", *ours.run("static", sets),
                       report.ref_ours)
        return
    if getattr(report, "ref_ours", None) is None or not report.fits("ours probe", need()):
        return
    wall, steps, computed, frames = ours.run("probe", [f"{CACHE}.method=first_block", f"{CACHE}.threshold=0"], report)
    report.add("ours", "probe", "first_block threshold 0 (+ measuring)", wall, steps, computed, frames, report.ref_ours)
    rec, step = report.probe["values"], report.probe["step_s"]
    for method in ("first_block", "teacache"):
        values = sorted(rec[method]) or [0.0]
        pct = {p: values[min(len(values) - 1, int(p / 100 * len(values)))] for p in (0, 5, 50, 95)}
        report.probe[f"{method}_threshold"] = 1.5 * statistics.median(values)
        check = statistics.mean(rec[f"{method}_check_s"] or [0.0])
        report.notes.append(f"{method}: per-step distance P00 {pct[0]:.4f}, P05 {pct[5]:.4f}, P50 {pct[50]:.4f}, "
                            f"P95 {pct[95]:.4f} ({len(rec[method])} calls); threshold = 1.5 x median = "
                            f"{report.probe[f'{method}_threshold']:.4f}; its check {check * 1e3:.3f} ms per DiT call, "
                            f"x2 branches = {200 * check / step:.3f}% of an uncached step ({step:.3f} s)")
    coeffs = []
    if args.cpu_smoke:  # the tiny DiT has no published fit: the 1.3B one, given explicitly
        from telefuser.runtime.caches.teacache import WAN21_COEFFICIENTS

        coeffs = [f"{CACHE}.coefficients=[{', '.join(repr(c) for c in WAN21_COEFFICIENTS['wan2.1_t2v_1.3b'])}]"]
    fb, tc = report.probe["first_block_threshold"], report.probe["teacache_threshold"]
    for name, sets, setting in (
            ("teacache", [f"{CACHE}.method=teacache", f"{CACHE}.threshold={tc:.6g}", *coeffs],
             f"threshold {tc:.4g} (1.3B fit)"),
            ("first_block", [f"{CACHE}.method=first_block", f"{CACHE}.threshold={fb:.6g}"], f"Fn 1, threshold {fb:.4g}"),
            ("taylorseer", [f"{CACHE}.method=taylorseer", f"{CACHE}.interval=2", f"{CACHE}.order=1"],
             "interval 2, order 1")):
        if report.fits(f"ours {name}", need()):
            report.add("ours", name, setting + f", warm-up {max(1, n // 10)}", *ours.run(name, [*sets, *warm]),
                       report.ref_ours)


# ---------------------------------------------------------------------------------------------- diffusers + cache-dit

class Theirs:
    def __init__(self, paths: dict) -> None:
        import transformers
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
        from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

        bf16 = torch.bfloat16
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        self.pipe = WanPipeline(
            tokenizer=PreTrainedTokenizerFast(tokenizer_file=str(paths["tokenizer"]), pad_token="<pad>",
                                              eos_token="</s>", unk_token="<unk>"),
            text_encoder=UMT5EncoderModel.from_pretrained(paths["text_encoder"].parent, **{dtype_kw: bf16}).eval(),
            vae=AutoencoderKLWan.from_pretrained(paths["vae"].parent, torch_dtype=bf16).eval(),
            transformer=WanTransformer3DModel.from_pretrained(paths["dit"].parent, torch_dtype=bf16).eval(),
            scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              num_train_timesteps=1000, flow_shift=5.0)).to("cuda")
        self.calls = 0
        self.pipe.transformer.blocks[-1].register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def run(self, steps: int, frames: int = 81):
        times: list[float] = []

        def step_end(_pipe, _i, _t, kwargs):
            sync()
            times.append(time.perf_counter())
            return kwargs

        self.calls = 0
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(prompt=PROMPT, negative_prompt="", height=480, width=832, num_frames=frames,
                            num_inference_steps=steps, max_sequence_length=512, guidance_scale=5.0, output_type="np",
                            generator=torch.Generator("cuda").manual_seed(SEED), callback_on_step_end=step_end)
        sync()
        wall = time.perf_counter() - start
        step_times = [b - a for a, b in zip(times, times[1:])]  # from the second step (the first includes encoding)
        step_times = [statistics.mean(step_times)] + step_times if step_times else []
        return wall, step_times, {"cond+uncond calls of the last block": self.calls}, out.frames[0]

    def cached(self, steps: int, **config):
        import cache_dit

        cache_dit.enable_cache(self.pipe, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=steps, **config))
        try:
            wall, step_times, computed, frames = self.run(steps)
            with contextlib.suppress(Exception):  # cache-dit's own count, where this version answers
                stats = cache_dit.summary(self.pipe)
                stats = stats[0] if isinstance(stats, (list, tuple)) else stats
                computed["cache-dit cached_steps"] = len(getattr(stats, "cached_steps", []) or [])
            return wall, step_times, computed, frames
        finally:
            cache_dit.disable_cache(self.pipe)


def theirs_rows(report: Report, theirs: Theirs, phase: str) -> None:
    n = report.args.steps
    need = report.probe.get("theirs_s", report.probe.get("video_s", 60.0)) * 1.2
    if phase == "static":
        if report.fits("diffusers warm-up", 60):
            theirs.run(2, frames=17)
        if not report.fits("diffusers uncached", max(need, 200)):
            return
        wall, steps, computed, frames = theirs.run(n)
        report.probe["theirs_s"], report.ref_theirs = wall, frames
        report.add("cache-dit", "uncached", "diffusers WanPipeline", wall, steps, computed, frames, frames)
        if report.fits("cache-dit static", need):
            mask = [1 if s in schedule(n) else 0 for s in range(n)]
            report.add("cache-dit", "static", "steps_computation_mask, policy static",
                       *theirs.cached(n, steps_computation_mask=mask, steps_computation_policy="static"),
                       report.ref_theirs)
    elif getattr(report, "ref_theirs", None) is not None and "first_block_threshold" in report.probe:
        thr = report.probe["first_block_threshold"]
        if report.fits("cache-dit DBCache", need):
            report.add("cache-dit", "DBCache", f"F1B0, residual_diff_threshold {thr:.4g}, warm-up {max(1, n // 10)}",
                       *theirs.cached(n, residual_diff_threshold=thr, max_warmup_steps=max(1, n // 10)),
                       report.ref_theirs)


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="our side on the tiny plan on the CPU (seconds)")
    parser.add_argument("--budget-s", type=float, default=560.0, help="stop starting runs past this many seconds")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; smoke 4)")
    parser.add_argument("--parts", default="static,cachedit,adaptive",
                        help="which groups run: static (ours uncached + static), cachedit (diffusers uncached + "
                             "cache-dit static, and DBCache after the probe), adaptive (probe + adaptive rows)")
    parser.add_argument("--root", default=os.environ.get("WAN_RANDOM_ROOT", "/tmp/wan21_cache"))
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.cpu_smoke else 50)
    args.label = "tiny plan 144p 9 frames (CPU)" if args.cpu_smoke else "480p 16:9 81 frames, bf16"
    report = Report(args)
    theirs = None
    if args.cpu_smoke:
        torch.manual_seed(0)
        paths: dict = {}
        import importlib.util

        report.skipped.append("cache-dit rows: skipped, " + ("the CPU smoke runs our side only (tiny plan)"
                              if importlib.util.find_spec("cache_dit") else "the cache_dit package is absent"))
        print(report.skipped[-1], flush=True)
    else:
        from bench.weights_random import write_wan21_diffusers
        from telefuser.models.t5.umt5 import UMT5_XXL
        from telefuser.models.wan.dit import WAN21_1_3B
        from telefuser.models.wan.vae import WanVAEConfig

        paths = write_wan21_diffusers(Path(args.root), WAN21_1_3B, WanVAEConfig(), UMT5_XXL, "cuda")
        print(f"[{time.perf_counter() - START:6.0f} s] weights ready under {args.root}", flush=True)
    ours = Ours(args, paths)
    parts = set(args.parts.split(","))
    if "static" in parts or "adaptive" in parts:  # the uncached video is every row's reference
        ours_rows(report, ours, "static")
    if not args.cpu_smoke and "cachedit" in parts:
        try:
            import cache_dit  # noqa: F401

            theirs = Theirs(paths)
            theirs_rows(report, theirs, "static")
        except ImportError as exc:
            report.skipped.append(f"cache-dit rows: skipped, {exc}")
        except Exception as exc:  # noqa: BLE001 - the peer's failure is a row's note, ours still run
            report.skipped.append(f"cache-dit rows: failed, {type(exc).__name__}: {exc}")
    if "adaptive" in parts:
        ours_rows(report, ours, "adaptive")
    if theirs is not None:
        try:
            theirs_rows(report, theirs, "adaptive")
        except Exception as exc:  # noqa: BLE001
            report.skipped.append(f"cache-dit DBCache: failed, {type(exc).__name__}: {exc}")
    report.write()
    print(report.table())


if __name__ == "__main__":
    main()
