"""Multi-GPU denoising step: TeleFuser's cfg / Ulysses / ring / USP layouts against diffusers' context parallelism.

One CFG step (the conditional and the unconditional prediction, combined at scale 5) of Wan2.1-1.3B at 480p x 81
frames (latent [1, 16, 21, 60, 104], 32,760 tokens) and Wan2.1-14B at 720p x 81 frames (latent [1, 16, 21, 90, 160],
75,600 tokens), text [1, 512, 4096] per branch, bf16, full-size random weights generated on every GPU from the same
seed (checked equal across ranks). The GPU count N comes from the machine; one process per GPU (NCCL), spawned once,
builds each model once and runs every layout on copies that share its weights:

- 1 GPU: every GPU runs the whole step alone at the same time (the slowest is reported): the reference for speedups
  and for the correctness check of each layout (max |diff| and relative L2 error of its prediction against it);
- TeleFuser, as its runtime runs a step (`telefuser.runtime.stages.denoise.guided`): cfg 2 (one branch per cfg rank,
  then an all_gather over "cfg"), ulysses g, ring g, USP (ring 2 x ulysses g/2) and cfg 2 x ulysses g/2 for g >= 4,
  the DiT parallelised by `parallelize_wan_dit`;
- diffusers' WanTransformer3DModel with the same weights, one batch-2 forward (cond + uncond) per step, context
  parallel through `ModelMixin.enable_parallelism(config=ContextParallelConfig(ulysses_degree=u, ring_degree=r,
  mesh=...))`, attention backend `_native_cudnn` (cuDNN through SDPA's private op, which returns the log-sum-exp that
  ring attention needs; `--diffusers-backend` picks another).

Each of `--attn-impls` (default: exact TORCH_SDPA, then our quantised SAGE_ATTN_2_8_8) is a pass over every layout
with its own 1-GPU baseline (diffusers in the first pass only); Ulysses layouts also run with the all-to-alls not
overlapped (`parallelize_wan_dit(..., ulysses_overlap=False)`), to show what the pipelining saves. Under ring, the
quantised rows are compared with their 1-GPU prediction at QUANTISED_RING_TOLERANCE (each rank quantises its own
key blocks).

Layouts of g < N GPUs run as N/g identical replicas (a "dp" mesh dimension), so one machine also measures the 2-GPU
layouts. Times: median over `--steps` timed steps after `--warmup`, each step the slowest rank's wall time between
a barrier and a device synchronise; peak memory: torch.cuda.max_memory_allocated, max over ranks, weights included.
A layout whose prediction is off the 1-GPU one by more than the tolerance is marked WRONG and gets no speedup.

Run on the GPU machine (diffusers and pydantic carried as wheels; stop at --budget-s, partial results kept):
    PYTHONPATH=. python3 bench/parallel.py [--models 1.3b,14b] [--budget-s 540]
writes $OUT/parallel.md (and parallel.json) after every layout and prints the table last.
The same logic on the CPU (gloo, 2 processes, tiny DiTs, float32): `PYTHONPATH=. python3 bench/parallel.py --cpu-smoke`.
This file runs the layouts (one process per GPU); bench/parallel_report.py renders the table.
"""

from __future__ import annotations

import os

# NVLink multicast stays off (the device machines' rule), set before anything can start NCCL or NVSHMEM; the worker
# processes inherit it.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402

from bench.common import TRITON_ROWS, Measured, environment, out_dir  # noqa: E402
from telefuser.ops.quantized_attention import VARIANTS  # noqa: E402
from bench.parallel_report import CFG_SCALE, render  # noqa: E402
from bench.weights_random import diffusers_transformer, meta_model  # noqa: E402
from telefuser.distributed.launch import free_port  # noqa: E402
from telefuser.distributed.parallelize_wan import parallelize_wan_dit  # noqa: E402
from telefuser.distributed.rank import RankContext  # noqa: E402
from telefuser.models.wan.dit import WAN21_1_3B, WAN21_14B, WanDiT, WanDiTConfig  # noqa: E402
from telefuser.models.wan.dit_keys import wan_to_diffusers  # noqa: E402
from telefuser.ops.dispatch import use_dispatch  # noqa: E402
from telefuser.runtime.stages.denoise import guided  # noqa: E402

SEED = 0
# Relative L2 error of a layout's prediction against the same side's 1-GPU one. bf16: on random weights, rounding
# differences grow through the 30-40 blocks: the two correct 1-GPU implementations (TeleFuser, diffusers) differ by
# 4.6e-2 (1.3B) and 4.9e-2 (14B), and ring (a different summation order) by 4.2e-2 / 4.4e-2 on both sides
# (H200, 2026-11-23); a misplaced shard is uncorrelated (rel ~1), so 1e-1 separates the two.
TOLERANCE = {"bf16": 1e-1, "fp32": 1e-4}
# Quantised attention under ring: each rank quantises its own key blocks (other K scales, another online-softmax
# order), so the prediction moves within the kernel's error (tests/test_quantized_attention.py: 6% per attention).
QUANTISED_RING_TOLERANCE = 1e-1
# The dispatch table of bench/wan21.py: SDPA for attention (cuDNN on the H100/H200), Triton kernels for the rest.
GPU_KERNELS = {"attention": "TORCH_SDPA", **TRITON_ROWS}
# diffusers backends whose forward op returns the log-sum-exp (ring attention needs it); "native" does not.
RING_BACKENDS = ("_native_cudnn", "_native_flash", "flash", "flash_hub", "_flash_3_hub", "sage", "sage_hub")


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    config: WanDiTConfig
    latent: tuple[int, int, int, int, int]
    text_len: int = 512

    @property
    def tokens(self) -> int:
        (pt, ph, pw), (f, h, w) = self.config.patch_size, self.latent[2:]
        return (f // pt) * (h // ph) * (w // pw)

    def step_flops(self) -> float:
        """FLOPs of one CFG step (two branches): projections, FFN, self- and cross-attention; for time estimates."""
        c, s, L = self.config, self.tokens, self.text_len
        per_token = 12 * c.dim**2 + 4 * c.dim * c.ffn_dim + 4 * s * c.dim + 4 * L * c.dim
        return 2 * c.num_layers * (s * per_token + 4 * L * c.dim**2)


MODELS = {
    "1.3b": ModelSpec("1.3b", "Wan2.1-1.3B 480p", WAN21_1_3B, (1, 16, 21, 60, 104)),
    "14b": ModelSpec("14b", "Wan2.1-14B 720p", WAN21_14B, (1, 16, 21, 90, 160)),
}
# --cpu-smoke: two tiny DiTs (the second has 6 heads, so Ulysses 4 is refused on 4 ranks and the skip path runs);
# head dim 32, the smallest the quantised attention takes.
SMOKE_MODELS = {
    "tiny": ModelSpec("tiny", "tiny DiT (4 heads)", WanDiTConfig(dim=128, ffn_dim=128, freq_dim=32, text_dim=48,
                                                                  num_heads=4, num_layers=2), (1, 16, 3, 8, 12), 16),
    "tiny6": ModelSpec("tiny6", "tiny DiT (6 heads)", WanDiTConfig(dim=192, ffn_dim=160, freq_dim=32, text_dim=48,
                                                                    num_heads=6, num_layers=2), (1, 16, 2, 6, 8), 16),
}


@dataclass(frozen=True)
class Layout:
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def gpus(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def name(self) -> str:
        if self.gpus == 1:
            return "1 GPU"
        if self.ring > 1 and self.ulysses > 1:
            sp = f"USP ring {self.ring} x ulysses {self.ulysses}"
        else:
            sp = f"ulysses {self.ulysses}" if self.ulysses > 1 else (f"ring {self.ring}" if self.ring > 1 else "")
        return " x ".join(part for part in (f"cfg {self.cfg}" if self.cfg > 1 else "", sp) if part)

    @property
    def kind(self) -> str:
        """cfg, ulysses or ring for the pure layouts (the ones with targets), else mixed."""
        if self.cfg > 1:
            return "cfg" if self.ring * self.ulysses == 1 else "mixed"
        if self.ring > 1:
            return "ring" if self.ulysses == 1 else "mixed"
        return "ulysses" if self.ulysses > 1 else "single"

    @property
    def diffusers_has_it(self) -> bool:
        """diffusers parallelises the sequence only (no cfg parallel in WanTransformer3DModel)."""
        return self.cfg == 1 and self.gpus > 1


def layouts_for(world: int, degrees: list[int]) -> list[Layout]:
    found: list[Layout] = []
    for g in degrees:
        if g == 2:
            found += [Layout(cfg=2), Layout(ulysses=2), Layout(ring=2)]
        elif g >= 4:
            found += [Layout(ulysses=g), Layout(ring=g), Layout(ring=2, ulysses=g // 2), Layout(cfg=2, ulysses=g // 2)]
    return found


def default_degrees(world: int) -> list[int]:
    """The machine's N first (the layouts asked for), then 2 (the targets) when N > 2."""
    if world < 2:
        return []
    return [world, 2] if world > 2 and world % 2 == 0 else [world]


# ----------------------------------------------------------------------------------------------------------------------
# models


def build_ours(cfg: WanDiTConfig, device: torch.device, dtype: torch.dtype) -> WanDiT:
    """Full-size WanDiT with random weights made on `device` (no float32 copy first: meta, then assigned); the same
    seed, so the same weights, on every rank."""
    from bench.weights_random import random_model

    return random_model(lambda: WanDiT(cfg), device, dtype, seed=SEED)


def no_meta(model: torch.nn.Module) -> torch.nn.Module:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} kept meta tensors after loading shared weights: {left[:5]}")
    return model


def share_ours(cfg: WanDiTConfig, state: dict[str, torch.Tensor]) -> WanDiT:
    """A fresh WanDiT whose parameters are the tensors of `state` (no copy), for one layout's hooks."""
    model = meta_model(lambda: WanDiT(cfg))
    model.load_state_dict(state, assign=True)
    return no_meta(model).eval().requires_grad_(False)


def share_diffusers(cfg: WanDiTConfig, state: dict[str, torch.Tensor], device: torch.device, backend: str):
    """diffusers' WanTransformer3DModel on the tensors of `state` (diffusers' key layout, no copy). Built on meta;
    its RoPE tables (non-persistent buffers, not in any state dict) are rebuilt on `device`."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    model = diffusers_transformer(cfg)
    model.load_state_dict(state, assign=True)
    rope = model.rope
    with torch.device(device):
        model.rope = WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
    no_meta(model).eval().requires_grad_(False)
    model.set_attention_backend(backend)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# one rank's work


class Bench:
    def __init__(self, rank: int, world: int, device: torch.device, args: argparse.Namespace, start: float) -> None:
        self.rank, self.world, self.device, self.args, self.start = rank, world, device, args, start
        self.cuda = device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.tolerance = TOLERANCE["bf16" if self.cuda else "fp32"]
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.meshes: dict[tuple[tuple[str, ...], tuple[int, ...]], DeviceMesh] = {}
        self.bases: list[tuple[ModelSpec, float, Optional[float]]] = []  # measured 1-GPU steps, for estimates
        self.diffusers_version: Optional[str] = None
        self.backend = args.diffusers_backend or ("_native_cudnn" if self.cuda else "native")
        self.env = self._environment()

    # -- plumbing --------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0:
            now = datetime.datetime.now().strftime("%H:%M:%S")
            print(f"[{now} +{time.time() - self.start:5.0f}s] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.time() - self.start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        self.sync()
        if self.world > 1 and self.cuda:
            dist.barrier(device_ids=[self.device.index])
        elif self.world > 1:
            dist.barrier()

    def all_max(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (time-budget choices depend on clocks that differ slightly)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        if self.world > 1:
            dist.broadcast(t, 0)
        return bool(t.item())

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def mesh(self, names: tuple[str, ...], shape: tuple[int, ...]) -> DeviceMesh:
        key = (names, shape)
        if key not in self.meshes:  # built once per shape: each one makes process groups (NCCL communicators)
            self.meshes[key] = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
        return self.meshes[key]

    def guarded(self, what: str, fn: Callable[[], Any]) -> tuple[Any, str]:
        """fn() on every rank; a failure on any rank (raised where no collective is pending) becomes an error row."""
        try:
            result, error = fn(), ""
        except Exception as exc:  # noqa: BLE001 (OOM, a refused layout, a diffusers error: recorded, not fatal)
            result, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''}"
        failed = self.all_max([1.0 if error else 0.0])[0] > 0
        if failed:
            result = None
            error = error or "failed on another rank"
            self.log(f"  {what}: FAILED ({error})")
            self.release()
        return result, error

    # -- measuring -------------------------------------------------------------------------------------------------
    def timed(self, step: Callable[[], torch.Tensor]) -> Measured:
        self.release()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        out = None
        for _ in range(self.args.warmup):
            out = step()
        times = []
        for _ in range(self.args.steps):
            self.barrier()
            t0 = time.perf_counter()
            out = step()
            self.sync()
            times.append(time.perf_counter() - t0)
        times = self.all_max(times)
        peak = None
        if self.cuda:
            peak = self.all_max([torch.cuda.max_memory_allocated(self.device) / 2**30])[0]
        assert out is not None
        return Measured(statistics.median(times), times, peak, out.float())

    def compare(self, out: torch.Tensor, ref: torch.Tensor, tolerance: Optional[float] = None) -> dict[str, float]:
        tolerance = self.tolerance if tolerance is None else tolerance
        diff = out - ref
        max_abs, rel = self.all_max([diff.abs().max().item(), (diff.norm() / ref.norm()).item()])
        return {"max_abs": max_abs, "rel": rel, "ok": bool(rel <= tolerance)}  # NaN is not ok

    def estimate(self, base_s: Optional[float], gpus: int) -> float:
        if base_s is None:
            return 0.0
        return (self.args.warmup + self.args.steps) * base_s / gpus * 1.4 + 5.0

    def fits(self, seconds: float) -> bool:
        return self.agree(self.elapsed() + seconds <= self.args.budget_s)

    # -- the job ---------------------------------------------------------------------------------------------------
    def run(self, specs: list[ModelSpec]) -> None:
        self.log(f"{self.world} rank(s) on {self.device.type}; {self.env}")
        self.diffusers_ready()
        for spec in specs:
            estimate = self.model_estimate(spec)
            if estimate and not self.fits(estimate):
                note = (f"{spec.title}: skipped, about {estimate:.0f} s of its baselines would not fit the "
                        f"{self.args.budget_s:.0f} s budget ({self.elapsed():.0f} s used); run `--models {spec.key}`.")
                self.notes.append(note)
                self.log(note)
                self.write()
                continue
            for index, impl in enumerate(self.args.attn_impls.split(",")):
                self.run_model(spec, impl, with_diffusers=index == 0)
                self.release()  # the model's weights went with run_model's frame
        if self.args.fsdp_memory and self.world > 1:  # the 14B DiT on GPUs: no forward needed, so always it
            self.fsdp_weights(MODELS["14b"] if self.cuda else specs[-1])
        self.log("done")
        self.write()

    def fsdp_weights(self, spec: ModelSpec) -> None:
        """The DiT's weight bytes per GPU, replicated and under enable_fsdp (FSDP2 over every rank), as the
        allocator counts them: built on the meta device, sharded, then each rank's share allocated."""
        from telefuser.distributed.fsdp import apply_fsdp

        model = meta_model(lambda: WanDiT(spec.config)).to(self.dtype)
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        apply_fsdp(model, self.mesh(("fsdp",), (self.world,)))
        self.release()
        before = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        model.to_empty(device=self.device)
        held = (torch.cuda.memory_allocated(self.device) - before) if self.cuda else sum(
            p.to_local().numel() * p.element_size() for p in model.parameters())
        held = self.all_max([float(held)])[0]
        note = (f"{spec.title}, enable_fsdp over {self.world} GPUs: DiT weights {held / 2**30:.2f} GiB per GPU "
                f"(the most on any rank) against {full / 2**30:.2f} GiB replicated ({full / held:.2f}x less).")
        self.notes.append(note)
        self.log(note)
        del model
        self.release()

    def diffusers_ready(self) -> None:
        if self.args.no_diffusers:
            self.notes.append("diffusers not measured (--no-diffusers).")
            return
        try:
            import diffusers
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.set_verbosity_error()  # enable_parallelism's "experimental" warning, once per model
            self.diffusers_version = diffusers.__version__
        except ImportError as exc:
            self.notes.append(f"diffusers not importable ({exc}): its columns stay empty.")
            return
        if not self.cuda and torch.accelerator.device_count() == 0:
            # diffusers' _resolve_parallel_config records the device `rank % torch.accelerator.device_count()`,
            # a division by zero on a CPU-only torch; the device is only recorded, so the CPU smoke run counts 1.
            torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
            self.notes.append("CPU smoke: torch.accelerator.device_count() reported as 1 for diffusers' "
                              "enable_parallelism (it divides the rank by it to name a device).")

    def model_estimate(self, spec: ModelSpec) -> float:
        """Seconds for spec's build and 1-GPU baselines, scaled by FLOPs from a model measured before (0: unknown)."""
        if not self.bases:
            return 0.0
        prev, ours_s, diff_s = self.bases[-1]
        ratio = spec.step_flops() / prev.step_flops()
        return (self.args.warmup + self.args.steps) * (ours_s + (diff_s or 0.0)) * ratio * 1.2 + 30.0

    def run_model(self, spec: ModelSpec, impl: str, with_diffusers: bool) -> None:
        """Every layout of one model with attention backend `impl`: its own 1-GPU baseline and rows (model key
        and title carry the backend when it is not the exact one); Ulysses layouts also without the overlap."""
        if impl != "TORCH_SDPA":
            spec = dataclasses.replace(spec, key=f"{spec.key} {impl}", title=f"{spec.title}, {impl}")
        cfg = spec.config
        self.log(f"{spec.title}: building the DiT ({spec.tokens:,} tokens, {cfg.num_layers} layers, dim {cfg.dim})")
        base = build_ours(cfg, self.device, self.dtype)
        self.check_same_weights(base)
        state = base.state_dict()
        diff_state = wan_to_diffusers(state)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(spec.latent, generator=g).to(self.device, self.dtype)
        context = torch.randn(1, spec.text_len, cfg.text_dim, generator=g).to(self.device, self.dtype)
        context_null = torch.randn(1, spec.text_len, cfg.text_dim, generator=g).to(self.device, self.dtype)
        t = torch.tensor([900.0], device=self.device)
        x2, t2, context2 = torch.cat([x, x]), t.repeat(2), torch.cat([context, context_null])
        params = sum(p.numel() for p in base.parameters())
        self.log(f"{spec.title}: {params / 1e9:.2f}B parameters; 1-GPU baselines")

        def ours_step(model: torch.nn.Module, rank: RankContext) -> Callable[[], torch.Tensor]:
            return lambda: guided(model, x, t, context, context_null, CFG_SCALE, rank)

        def diffusers_step(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
            def step() -> torch.Tensor:
                out = model(hidden_states=x2, timestep=t2, encoder_hidden_states=context2, return_dict=False)[0]
                cond, uncond = out.float().chunk(2)
                return uncond + CFG_SCALE * (cond - uncond)
            return step

        dispatch = use_dispatch({**(GPU_KERNELS if self.cuda else {}), "attention": impl})
        with torch.inference_mode(), dispatch:
            row = self.new_row(spec, Layout())
            ours1, error = self.guarded("TeleFuser 1 GPU", lambda: self.timed(ours_step(base, RankContext())))
            row["ours_error"] = error
            diff1 = None
            if self.diffusers_version and with_diffusers:
                ref, error = self.guarded("diffusers build",
                                          lambda: share_diffusers(cfg, diff_state, self.device, self.backend))
                if ref is not None:
                    diff1, error = self.guarded("diffusers 1 GPU", lambda: self.timed(diffusers_step(ref)))
                    del ref
                row["diffusers_error"] = error
            if ours1 is not None:
                row["ours"] = ours1.summary()
            if diff1 is not None:
                row["diffusers"] = diff1.summary()
            if ours1 is not None and diff1 is not None:
                row["cross"] = self.compare(ours1.out, diff1.out)
            self.finish_row(row)
            if ours1 is None:
                self.notes.append(f"{spec.title}: the 1-GPU TeleFuser step failed; no layout measured.")
                return
            self.bases.append((spec, ours1.seconds, diff1.seconds if diff1 else None))

            for layout in layouts_for(self.world, self.args.degrees):
                self.run_layout(spec, layout, state, diff_state, ours1, diff1, ours_step, diffusers_step)
                if layout.ulysses > 1 and layout.ring == 1:  # what the pipelined all-to-alls save
                    self.run_layout(spec, layout, state, diff_state, ours1, None, ours_step, diffusers_step,
                                    overlap=False)

    def check_same_weights(self, model: torch.nn.Module) -> None:
        if self.world == 1:
            return
        sums = torch.stack([p.sum(dtype=torch.float32) for p in model.parameters()])
        lead = sums.clone()
        dist.broadcast(lead, 0)
        differ = self.all_max([0.0 if torch.equal(sums, lead) else 1.0])[0] > 0
        if differ:  # not expected: the same seed on the same kind of device; make them equal rather than guess
            for p in model.parameters():
                dist.broadcast(p.data, 0)
            self.notes.append("random weights differed across ranks after seeding; rank 0's were broadcast.")
        self.log(f"  weights {'broadcast from rank 0' if differ else 'identical on every rank (checksums)'}")

    def run_layout(self, spec: ModelSpec, layout: Layout, state: dict[str, torch.Tensor],
                   diff_state: dict[str, torch.Tensor], ours1: Measured, diff1: Optional[Measured],
                   ours_step: Callable, diffusers_step: Callable, overlap: bool = True) -> None:
        row = self.new_row(spec, layout)
        if not overlap:
            row["layout"] += " (all-to-alls not overlapped)"
        heads = spec.config.num_heads
        if heads % layout.ulysses:
            row["skipped"] = f"Ulysses {layout.ulysses} does not divide the {heads} heads"
            self.log(f"{spec.title} {layout.name}: skipped ({row['skipped']})")
            self.finish_row(row)
            return
        replicas = self.world // layout.gpus
        if not self.fits(self.estimate(ours1.seconds, layout.gpus)):
            row["skipped"] = "time budget"
            self.log(f"{spec.title} {layout.name}: skipped (time budget, {self.elapsed():.0f} s used)")
            self.finish_row(row)
            return
        self.log(f"{spec.title} {layout.name} ({layout.gpus} GPUs"
                 f"{f', {replicas} replicas' if replicas > 1 else ''}): TeleFuser")
        dims = [("dp", replicas), ("cfg", layout.cfg), ("sp_ring", layout.ring), ("sp_ulysses", layout.ulysses)]
        dims = [(n, d) for n, d in dims if d > 1]
        mesh = self.mesh(tuple(n for n, _ in dims), tuple(d for _, d in dims))

        def ours() -> Measured:
            model = parallelize_wan_dit(share_ours(spec.config, state), mesh, ulysses_overlap=overlap)
            coords = {"cfg": mesh.get_local_rank("cfg")} if layout.cfg > 1 else {}
            rank = RankContext(rank=self.rank, world_size=self.world, device=self.device, mesh=mesh, coords=coords)
            return self.timed(ours_step(model, rank))

        got, row["ours_error"] = self.guarded(f"TeleFuser {layout.name}", ours)
        if got is not None:
            quantised_ring = layout.ring > 1 and spec.key.endswith(tuple(VARIANTS))
            row["ours"] = {**got.summary(),
                           **self.compare(got.out, ours1.out, QUANTISED_RING_TOLERANCE if quantised_ring else None)}
        del got

        if diff1 is not None and layout.diffusers_has_it:
            if layout.ring > 1 and self.backend not in RING_BACKENDS:
                row["diffusers_error"] = (f"not run: ring attention needs a backend that returns the LSE; "
                                          f"'{self.backend}' does not{' (none runs on the CPU)' if not self.cuda else ''}")
            elif not self.fits(self.estimate(diff1.seconds, layout.gpus)):
                row["diffusers_error"] = "skipped (time budget)"
            else:
                self.log(f"{spec.title} {layout.name}: diffusers")
                from diffusers import ContextParallelConfig

                names = (("dp",) if replicas > 1 else ()) + ("ring", "ulysses")
                shape = ((replicas,) if replicas > 1 else ()) + (layout.ring, layout.ulysses)
                cp_mesh = self.mesh(names, shape)

                def theirs() -> Measured:
                    model = share_diffusers(spec.config, diff_state, self.device, self.backend)
                    model.enable_parallelism(config=ContextParallelConfig(
                        ring_degree=layout.ring, ulysses_degree=layout.ulysses, mesh=cp_mesh))
                    return self.timed(diffusers_step(model))

                got, row["diffusers_error"] = self.guarded(f"diffusers {layout.name}", theirs)
                if got is not None:
                    row["diffusers"] = {**got.summary(), **self.compare(got.out, diff1.out)}
                del got
        self.finish_row(row)

    # -- results ---------------------------------------------------------------------------------------------------
    def new_row(self, spec: ModelSpec, layout: Layout) -> dict[str, Any]:
        return {"model": spec.key, "title": spec.title, "layout": layout.name, "kind": layout.kind,
                "gpus": layout.gpus, "replicas": self.world // layout.gpus if layout.gpus > 1 else self.world,
                "latent": list(spec.latent), "tokens": spec.tokens, "heads": spec.config.num_heads,
                "dim": spec.config.dim, "layers": spec.config.num_layers, "text_len": spec.text_len}

    def finish_row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        parts = []
        for side, label in (("ours", "TeleFuser"), ("diffusers", "diffusers")):
            m = row.get(side)
            if m:
                peak = f", peak {m['peak_gib']:.1f} GiB" if m.get("peak_gib") is not None else ""
                check = f", rel {m['rel']:.1e}{'' if m['ok'] else ' WRONG'}" if "rel" in m else ""
                parts.append(f"{label} {m['s']:.3f} s/step{peak}{check}")
            elif row.get(f"{side}_error"):
                parts.append(f"{label}: {row[f'{side}_error']}")
        if "cross" in row:
            parts.append(f"TeleFuser vs diffusers rel {row['cross']['rel']:.1e}")
        if parts:
            self.log(f"  {row['title']} {row['layout']}: " + "; ".join(parts))
        self.write()

    def write(self) -> None:
        if self.rank != 0:
            return
        directory = out_dir()
        for name, text in (("parallel.md", render(self) + "\n"),
                           ("parallel.json", json.dumps({"environment": self.env, "world": self.world,
                                                          "backend": self.backend, "rows": self.rows,
                                                          "notes": self.notes}, indent=1, default=str) + "\n")):
            tmp = directory / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, directory / name)

    def _environment(self) -> str:
        if self.cuda:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
            return f"{environment()}, NCCL {nccl}, {self.world} GPU(s)"
        return (f"CPU smoke run ({platform.machine()}, gloo, {self.world} processes, float32), PyTorch "
                f"{torch.__version__}, Python {platform.python_version()}, {datetime.date.today().isoformat()}")


# ----------------------------------------------------------------------------------------------------------------------
# processes


def _worker(rank: int, world: int, port: int, opts: dict[str, Any], start: float) -> None:
    args = argparse.Namespace(**opts)
    # diffusers' context-parallel hooks call a torch collective that now warns on every forward
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated")
    if args.cpu_smoke:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if args.cpu_smoke else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=args.collective_timeout_s))
    try:
        specs = list(SMOKE_MODELS.values()) if args.cpu_smoke else [MODELS[k] for k in args.models]
        Bench(rank, world, device, args, start).run(specs)
    finally:
        dist.destroy_process_group()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1.3b,14b", help="comma-separated, in order: 1.3b, 14b (default both)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per layout (default 1)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per layout (default 2)")
    p.add_argument("--degrees", default="", help="GPU counts of the layouts, e.g. 2,4,8 (default: N, then 2)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting work that would end later than this many seconds after launch (default 540)")
    p.add_argument("--diffusers-backend", default="", help="diffusers attention backend (default _native_cudnn on GPU)")
    p.add_argument("--no-diffusers", action="store_true", help="TeleFuser only")
    p.add_argument("--attn-impls", default="TORCH_SDPA,SAGE_ATTN_2_8_8",
                   help="TeleFuser attention backends, each a pass over every layout (default exact, then our "
                        "quantised kernel; diffusers runs in the first pass only)")
    p.add_argument("--collective-timeout-s", type=float, default=0.0, help="process-group timeout (default 180 / 60)")
    p.add_argument("--fsdp-memory", action="store_true",
                   help="also the 14B DiT's weight bytes per GPU, replicated and under enable_fsdp")
    p.add_argument("--cpu-smoke", action="store_true", help="the whole logic on the CPU: gloo, tiny DiTs, float32")
    p.add_argument("--world", type=int, default=2, help="processes in --cpu-smoke mode (default 2)")
    args = p.parse_args(argv)
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    args.collective_timeout_s = args.collective_timeout_s or (60.0 if args.cpu_smoke else 180.0)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    start = time.time()
    args = parse_args(argv)
    if args.cpu_smoke:
        world = args.world
    else:
        if not torch.cuda.is_available():
            print("bench/parallel.py needs CUDA GPUs (or --cpu-smoke for the CPU check).", file=sys.stderr)
            return 2
        world = torch.cuda.device_count()
    degrees = [int(d) for d in args.degrees.split(",") if d.strip()] if args.degrees else default_degrees(world)
    bad = [d for d in degrees if d < 2 or world % d]
    if bad:
        print(f"--degrees {bad}: each must be >= 2 and divide the {world} GPUs/processes.", file=sys.stderr)
        return 2
    args.degrees = sorted(set(degrees), key=degrees.index)
    for stale in ("parallel.md", "parallel.json"):  # a timed-out run must not leave an older table behind
        (out_dir() / stale).unlink(missing_ok=True)
    print(f"bench/parallel.py: {world} {'process' if args.cpu_smoke else 'GPU'}(s), layouts on {args.degrees or 'none'}"
          f" GPUs, models {list(SMOKE_MODELS) if args.cpu_smoke else args.models}, budget {args.budget_s:.0f} s",
          flush=True)
    if args.cpu_smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.spawn(_worker, args=(world, free_port(), vars(args), start), nprocs=world, join=False)
    status = 0
    hard_stop = start + args.budget_s + 40.0  # the device call's own limit is 600 s: keep time to print
    try:
        while not context.join(timeout=2):
            if time.time() > hard_stop:
                print(f"workers still running {args.budget_s + 40:.0f} s after launch: stopping them", flush=True)
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                status = 1
                break
    except Exception as exc:  # noqa: BLE001 (a worker's failure: report it, print what was written)
        print(f"a worker failed: {exc}", file=sys.stderr, flush=True)
        status = 1
    table = out_dir() / "parallel.md"
    print("\n" + (table.read_text() if table.exists() else "no results were written"), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
