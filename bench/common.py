"""Shared benchmark helpers: environment header, synchronising and freeing, timing (`Measured`, `measure`), the two
ceilings (copy bandwidth, bf16 matmul)."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch


def sync() -> None:
    """Wait for the GPU's queued work (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free(host_cache: bool = True) -> None:
    """Garbage, the caching allocator's free device blocks and (`host_cache`) PyTorch's cached pinned host blocks
    given back; a later pinned allocation then pays the driver's page locking again, as a fresh process does."""
    gc.collect()
    if not torch.cuda.is_available():
        return
    torch.cuda.empty_cache()
    if not host_cache:
        return
    if hasattr(torch.accelerator, "empty_host_cache"):  # the public name (newer PyTorch)
        torch.accelerator.empty_host_cache()
        return
    for name in ("_host_emptyCache", "_cuda_hostEmptyCache", "_accelerator_emptyHostCache"):
        if hasattr(torch._C, name):
            getattr(torch._C, name)()
            return


@dataclass
class Measured:
    """Timed calls: the median and every time (seconds), the peak device memory over them (GiB; None without
    CUDA) and the part of it above what was allocated before them, the last output in float32."""

    seconds: float
    times: list[float]
    peak_gib: Optional[float]
    out: Optional[torch.Tensor] = None
    extra_gib: Optional[float] = None

    @property
    def ms(self) -> float:
        return self.seconds * 1e3

    def summary(self) -> dict[str, Any]:
        return {"s": self.seconds, "times": self.times, "peak_gib": self.peak_gib}


def measure(fn: Callable[[], torch.Tensor], runs: int, warmup: Callable[[], object] | None = None) -> Measured:
    """Median of `runs` synchronised calls after one warm-up call (`warmup`, default `fn` itself), the peak
    memory over all of them, and the last output in float32."""
    free(host_cache=False)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0
    with torch.inference_mode():
        (warmup or fn)()
        sync()
        times, out = [], None
        for _ in range(runs):
            out = None  # the previous output is not kept alive across a call
            start = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - start)
        out = out.float()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return Measured(statistics.median(times), times, peak / 2**30, out, (peak - resident) / 2**30)  # 0 on a CPU


def environment() -> str:
    import triton

    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
            f"PyTorch {torch.__version__}, Triton {triton.__version__}, CUDA {torch.version.cuda}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds (CUDA events, triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def wall_ms(fn, runs: int = 3) -> float:
    """Median milliseconds of a long call (seconds each): synchronised wall clock after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus written."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def bf16_matmul_tflops(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = bench_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "bench_out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- recipes

REPO = Path(__file__).resolve().parents[1]
# The row ops our GPU rows run through the Triton kernels (the compiler's dispatch on CUDA); attention is each row's own.
TRITON_ROWS = {op: "triton" for op in ("rms_norm", "layer_norm", "norm_modulate", "modulate", "rotary",
                                       "gated_add")}
GPU_PRESETS = ("H200", "H100", "B200", "A100", "L40S", "RTX4090")  # schema/targets.py's presets


def target_overrides(smoke: bool) -> list[str]:
    """`--set`s of the target: the CPU for a smoke run, else this machine's GPU by its preset."""
    if smoke:
        return ["target.device=cpu"]
    name = torch.cuda.get_device_name().replace(" ", "")
    return ["target.device=cuda", f"target.gpu={next((p for p in GPU_PRESETS if p in name), 'H100')}"]


def size_overrides(frames: int, text_len: int, resolution: str, steps: Optional[int] = None) -> list[str]:
    out = [f"layer2.num_frames={frames}", f"layer2.text_len={text_len}", f"layer3.resolution.default={resolution}",
           f'layer3.resolution.choices=["{resolution}"]']
    return out + ([f"layer2.num_inference_steps={steps}"] if steps is not None else [])


def offload_overrides(modes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """model name -> offload_config keys, e.g. {"dit": {"offload_type": "ASYNC_CPU_OFFLOAD"}}."""
    return [f"layer2.models.{name}.offload_config.{key}={value}" for name, config in modes.items()
            for key, value in config.items()]


def compile_shipped(recipe: str, plan: Path, paths: Mapping[str, Any], overrides: Sequence[str] = (),
                    explain: bool = False) -> Path:
    """recipes/<recipe>.toml, each model named in `paths` pointed at its file (random weights of the real shapes),
    the `--set` `overrides` applied, compiled into the plan file `plan` (with `explain`, its summary printed)."""
    from telefuser.compiler import compile_recipe
    from telefuser.schema.canonical import pretty_json

    sets = [f"layer1.models.{name}.path={path}" for name, path in paths.items()] + list(overrides)
    compiled = compile_recipe(REPO / "recipes" / f"{recipe}.toml", sets)
    plan.write_text(pretty_json(compiled.model_dump(mode="json", by_alias=True)))
    if explain:
        from telefuser.cli.compile import main as compile_main

        assert compile_main(["--explain", str(plan)]) == 0
    return plan
