"""Sparse attention on one GPU (issue 25): our block-sparse kernels under the Radial and local masks against dense
cuDNN attention, at Wan2.1 81 frames (480p and 720p), in one device call.

Per shape (B = 1, the heads of one rank: Wan2.1 14B 40 x 128, 1.3B 12 x 128; bf16 BSND views of one packed
[B, S, 3, N, D] qkv tensor, as the DiT makes them):
- cuDNN dense (SDPA's cuDNN kernel): the peer;
- our dense ceiling: the 16-bit block-sparse kernel with every block listed (`block_sparse_attention.py`);
- SAGE_ATTN_2_8_8 / 2_8_16 dense (`sage_attention.py`): the quantised kernels the sparse SAGE rows walk;
- radial (block 128, decay 1) through the 16-bit kernel, and through the quantised kernel's block-sparse mode
  (`sage_sparse_attention.py`) with SAGE_ATTN_2_8_8 and 2_8_16; local (window 6) through both kinds.
Each row's error: relative L2 over 256 query rows (a middle mask block pair) against float32 attention with the same
block mask applied (SDPA, token mask), with the bound the tests use (bf16 8e-3, 2_8_16 3%, 2_8_8 6%).
"x cuDNN" = cuDNN dense ms / row ms; TOPS counted as dense work (4 B N S^2 D / time), so sparse rows read as the
dense throughput they stand in for.

Before the rows a sweep of the 16-bit kernel's `SWEEP` configs on the dense ceiling at 480p 14B picks the config
the rows then run (`block_sparse_attention.TUNED` updated in-process; the winner is written down: copy it into
TUNED). Every row is guarded (a failure is written as that row's error and the run goes on) and the results are
written after each row to $OUT/sparse.md and $OUT/sparse.json; `--budget-s` skips rows once the time is spent.

Run on the device: `PYTHONPATH=. python3 bench/sparse.py` (runs the GPU tests of the kernels first; `--no-tests`
skips them; `--step` adds a whole 14B DiT CFG step at 720p, radial beside dense: bench/sparse_step.py). `python bench/sparse.py --cpu-smoke`: a tiny grid through every row under TRITON_INTERPRET=1 on the
CPU (checks the script, times nothing meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

GRIDS = {"720p 81f": (21, 45, 80), "480p 81f": (21, 30, 52)}  # latent frames x patch rows x patch columns
HEADS = {"14B": 40, "1.3B": 12}
TEST_FILES = ("tests/test_block_sparse.py", "tests/test_sage_sparse.py", "tests/test_sparse_masks.py")
BOUND = {"bf16": 8e-3, "SAGE_ATTN_2_8_16": 0.03, "SAGE_ATTN_2_8_8": 0.06}
REF_ROWS = 256
SMOKE_GRID = (9, 4, 16)  # 576 tokens, 5 blocks: radial density 0.36, local 0.92


class Report:
    """Rows written to $OUT after each one (atomically), with the run's header and sweep."""

    def __init__(self, args: argparse.Namespace, header: str) -> None:
        from bench.common import out_dir

        self.args, self.header, self.start = args, header, time.monotonic()
        self.out = Path(args.out) if args.out else out_dir()
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.sweep: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def write(self) -> None:
        lines = [f"Sparse attention, {self.header}", ""]
        if self.sweep:
            where = "the smoke grid" if self.args.cpu_smoke else "480p 81f 14B"
            lines += [f"16-bit kernel sweep (dense ceiling, {where}):", "",
                      "| config | ms | x cuDNN |", "|---|---|---|"]
            lines += [f"| {s['config']} | {_fmt(s.get('ms'))} | {_fmt(s.get('x_cudnn'), 'x')} |" for s in self.sweep]
            lines.append("")
        lines += ["| shape | heads | attention | density | ms | dense-equiv TOPS | x cuDNN dense | rel err vs masked "
                  "fp32 | bound |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            err = r.get("error") or ""
            lines.append(f"| {r['shape']} | {r['heads']} | {r['attention']} | {_fmt(r.get('density'))} | "
                         f"{_fmt(r.get('ms'))} | {_fmt(r.get('tops'), '', 0)} | {_fmt(r.get('x_cudnn'), 'x')} | "
                         f"{_fmt(r.get('rel_err'), '', 1, 'e')} | {r.get('bound', '')}{' ' + err if err else ''} |")
        lines += ["", *self.notes]
        text = "\n".join(lines) + "\n"
        for name, content in (("sparse.md", text), ("sparse.json", json.dumps(
                {"header": self.header, "sweep": self.sweep, "rows": self.rows, "notes": self.notes}, indent=1))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(content)
            tmp.replace(self.out / name)

    def row(self, base: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one row guarded: its failure (or the budget) is written as the row's error."""
        record = dict(base)
        if self.left_s() < 0:
            record["error"] = "skipped: --budget-s spent"
        else:
            try:
                record.update(fn())
            except Exception as exc:  # one row's failure must not lose the others
                record["error"] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                traceback.print_exc()
        self.rows.append(record)
        self.write()
        print(record, file=sys.stderr, flush=True)
        return record


def _fmt(x: Optional[float], suffix: str = "", digits: int = 2, kind: str = "f") -> str:
    return "" if x is None else f"{x:.{digits}{kind}}{suffix}"


def _sweep_configs(smoke: bool) -> list:
    from telefuser.kernels.triton.block_sparse_attention import KernelConfig as K

    if smoke:
        return [K(128, 64, 4, 1, False, True), K(64, 64, 4, 1, True, False)]
    return [K(128, 64, 4, 3, True, True), K(128, 64, 4, 2, True, True), K(128, 128, 4, 2, True, True),
            K(128, 128, 8, 3, True, False), K(128, 64, 8, 3, True, False), K(64, 64, 4, 3, True, False),
            K(128, 64, 4, 3, False, True)]


def _timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    if smoke:
        def wall(fn: Callable[[], object]) -> float:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return wall
    from bench.common import bench_ms

    return lambda fn: bench_ms(fn, warmup=300, rep=1200)


def masked_reference(q, k, v, mask, bs: int, row0: int):
    """float32 attention of query rows row0 .. row0 + REF_ROWS over all keys, the block mask applied: [1, R, N, D]."""
    import torch
    import torch.nn.functional as F

    rows = slice(row0, min(row0 + REF_ROWS, q.shape[1]))
    row_blocks = torch.arange(rows.start, rows.stop, device=q.device) // bs
    tokens = mask.to(q.device)[row_blocks].repeat_interleave(bs, dim=1)[:, : k.shape[1]]
    out = F.scaled_dot_product_attention(q[:, rows].float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), attn_mask=tokens)
    return out.transpose(1, 2), rows


def run_shape(report: Report, shape: str, grid: tuple[int, int, int], model: str, heads: int, smoke: bool) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from telefuser.kernels.triton.block_sparse_attention import block_sparse_attention
    from telefuser.kernels.triton.sage_attention import sage_attention
    from telefuser.kernels.triton.sage_sparse_attention import sage_sparse_attention
    from telefuser.ops import sparse_attention as sa

    device = "cpu" if smoke else "cuda"
    ms_of = _timer(smoke)
    s = grid[0] * grid[1] * grid[2]
    d = 64 if smoke else 128
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(1, s, 3, heads, d, device=device, dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    dense_work = 4 * heads * s * s * d
    patterns = {"radial": SimpleNamespace(sparse_impl="radial", block_size=128, decay_factor=1.0),
                "local 6": SimpleNamespace(sparse_impl="local", block_size=128, local_window_size=6)}
    masks = {name: sa.block_mask_for(cfg, grid) for name, cfg in patterns.items()}
    layouts = {name: sa.block_layout_for(cfg, grid, device) for name, cfg in patterns.items()}
    full_mask = torch.ones(masks["radial"].shape, dtype=torch.bool)
    masks["dense"], layouts["dense"] = full_mask, sa.layout_from_mask(full_mask, 128).to(device)
    mb = full_mask.shape[0]
    row0 = (mb // 2) * 128  # a middle block row: radial keeps a band there, not only the sink
    refs: dict[str, Any] = {}
    base = {"shape": f"{shape} (S={s})", "heads": f"{model}: {heads} x {d}"}
    cudnn: dict[str, float] = {}

    def timed(fn: Callable[[], Any], pattern: str, kind: str) -> dict[str, Any]:
        out = fn()
        if pattern not in refs:
            refs[pattern] = masked_reference(q, k, v, masks[pattern], 128, row0)
        ref, rows = refs[pattern]
        err = ((out[:, rows].float() - ref).norm() / ref.norm()).item()
        del out
        ms = ms_of(fn)
        rec = {"ms": ms, "tops": dense_work / ms / 1e9, "density": sa.density(masks[pattern]), "rel_err": err,
               "bound": BOUND[kind], "x_cudnn": cudnn["ms"] / ms if "ms" in cudnn else None}
        if err > BOUND[kind]:
            rec["error"] = f"ERROR ABOVE BOUND ({err:.2e} > {BOUND[kind]})"
        return rec

    def cudnn_row() -> dict[str, Any]:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        # the float32 masked reference has no cuDNN kernel: made before the backend is pinned to cuDNN
        refs["dense"] = masked_reference(q, k, v, masks["dense"], 128, row0)
        if smoke:
            rec = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2), "dense", "bf16")
        else:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                rec = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2), "dense", "bf16")
        cudnn["ms"] = rec["ms"]
        rec["x_cudnn"] = 1.0
        return rec

    def bf16(pattern: str) -> Callable[[], dict[str, Any]]:
        lay = layouts[pattern]
        return lambda: timed(lambda: block_sparse_attention(q, k, v, lay.counts, lay.indices, 128), pattern, "bf16")

    def sage_sparse(pattern: str, variant: str) -> Callable[[], dict[str, Any]]:
        lay, pv_fp8 = layouts[pattern], variant == "SAGE_ATTN_2_8_8"
        return lambda: timed(lambda: sage_sparse_attention(q, k, v, lay.counts, lay.indices, 128, pv_fp8),
                             pattern, variant)

    def sage_dense(variant: str) -> Callable[[], dict[str, Any]]:
        pv_fp8 = variant == "SAGE_ATTN_2_8_8"
        return lambda: timed(lambda: sage_attention(q, k, v, pv_fp8=pv_fp8), "dense", variant)

    report.row({**base, "attention": "cuDNN dense (SDPA)"}, cudnn_row)
    report.row({**base, "attention": "ours dense ceiling (16-bit kernel, every block)"}, bf16("dense"))
    report.row({**base, "attention": "radial, 16-bit kernel"}, bf16("radial"))
    for variant in ("SAGE_ATTN_2_8_8", "SAGE_ATTN_2_8_16"):
        report.row({**base, "attention": f"radial + {variant}"}, sage_sparse("radial", variant))
    report.row({**base, "attention": "local 6, 16-bit kernel"}, bf16("local 6"))
    report.row({**base, "attention": "local 6 + SAGE_ATTN_2_8_8"}, sage_sparse("local 6", "SAGE_ATTN_2_8_8"))
    for variant in ("SAGE_ATTN_2_8_8", "SAGE_ATTN_2_8_16"):
        report.row({**base, "attention": f"{variant} dense"}, sage_dense(variant))


def sweep(report: Report, smoke: bool) -> None:
    """Time `_sweep_configs` on the dense ceiling (480p 14B; the smoke run: its tiny grid) and make the fastest
    correct one the kernel's TUNED config for the rows."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from telefuser.kernels.triton import block_sparse_attention as bsa
    from telefuser.ops import sparse_attention as sa

    device = "cpu" if smoke else "cuda"
    grid = SMOKE_GRID if smoke else GRIDS["480p 81f"]
    heads, d = (2, 64) if smoke else (40, 128)
    s = grid[0] * grid[1] * grid[2]
    ms_of = _timer(smoke)
    qkv = torch.randn(1, s, 3, heads, d, device=device, dtype=torch.bfloat16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if smoke:
        ref = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt)
    cudnn_ms = None if smoke else ms_of(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    lay = sa.layout_from_mask(torch.ones(-(-s // 128), -(-s // 128), dtype=torch.bool), 128).to(device)
    best = None
    for cfg in _sweep_configs(smoke):
        entry: dict[str, Any] = {"config": str(cfg)}
        try:
            out = bsa.block_sparse_attention(q, k, v, lay.counts, lay.indices, 128, config=cfg)
            err = ((out.float() - ref.transpose(1, 2).float()).norm() / ref.float().norm()).item()
            if err > 1e-2:
                raise RuntimeError(f"off by {err:.2e} against SDPA")
            entry["ms"] = ms_of(lambda: bsa.block_sparse_attention(q, k, v, lay.counts, lay.indices, 128, config=cfg))
            entry["x_cudnn"] = cudnn_ms / entry["ms"] if cudnn_ms else None
            if best is None or entry["ms"] < best[0]:
                best = (entry["ms"], cfg)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        report.sweep.append(entry)
        report.write()
    if best is not None and not smoke:
        for dim in (64, 128):
            bsa.TUNED[(torch.cuda.get_device_capability(), dim)] = best[1]
    report.notes.append(f"16-bit kernel config for the rows: {best[1] if best else 'default (sweep failed)'}")
    report.write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny grid on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--no-tests", action="store_true", help="skip the GPU tests of the kernels")
    parser.add_argument("--no-sweep", action="store_true", help="run the rows with TUNED as it is")
    parser.add_argument("--models", default="14B,1.3B", help="comma-separated among 14B, 1.3B")
    parser.add_argument("--shapes", default="720p,480p", help="comma-separated among 720p, 480p")
    parser.add_argument("--step", action="store_true",
                        help="also a whole Wan2.1-14B DiT CFG step at 720p, radial beside dense (bench/sparse_step.py)")
    parser.add_argument("--budget-s", type=float, default=560.0, help="rows after this many seconds are skipped")
    parser.add_argument("--out", default=None, help="output folder (default $OUT)")
    args = parser.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    if args.cpu_smoke:
        header = "CPU smoke (TRITON_INTERPRET=1): times mean nothing"
    else:
        from bench.common import environment

        header = environment()
    report = Report(args, header)
    if not args.cpu_smoke and not args.no_tests:
        try:
            tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES],
                                   capture_output=True, text=True, timeout=180)
            tail = tests.stdout.strip().splitlines()[-1:] if tests.stdout.strip() else ["(no output)"]
            report.notes.append(f"GPU tests ({', '.join(TEST_FILES)}): {tail[0]}")
            print(tests.stdout[-3000:], file=sys.stderr)
        except subprocess.TimeoutExpired:
            report.notes.append("GPU tests: timed out after 180 s (not counted)")
        report.write()
    if not args.no_sweep:
        try:
            sweep(report, args.cpu_smoke)
        except Exception as exc:
            report.notes.append(f"sweep failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    shapes = [("tiny 9x4x16", SMOKE_GRID)] if args.cpu_smoke else [
        (name, grid) for name, grid in GRIDS.items() if name.split()[0] in args.shapes.split(",")]
    models = {"tiny": 2} if args.cpu_smoke else {m: HEADS[m] for m in args.models.split(",")}
    for model, heads in models.items():  # the 14B first: the target is 14B at 720p
        for shape, grid in shapes:
            run_shape(report, shape, grid, model, heads, args.cpu_smoke)  # its tensors go with its frame
            if not args.cpu_smoke:
                import torch

                torch.cuda.empty_cache()
    if args.step:
        from bench.sparse_step import step_rows

        step_rows(report, args.cpu_smoke)
    report.write()
    print((report.out / "sparse.md").read_text())


if __name__ == "__main__":
    main()
