"""Shared benchmark helpers: environment header, timing, the two ceilings (copy bandwidth, bf16 matmul)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from pathlib import Path

import torch
import triton
import triton.testing


def environment() -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
            f"PyTorch {torch.__version__}, Triton {triton.__version__}, CUDA {torch.version.cuda}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds (CUDA events, triton.testing.do_bench)."""
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
