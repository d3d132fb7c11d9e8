"""Ops benchmark on one GPU: kernels vs PyTorch eager vs torch.compile, attention backends, FP8 linear.

Run on the device: `PYTHONPATH=. python3 bench/ops.py` (first runs the GPU tests of ops and kernels).
Writes $OUT/ops.md (the table for docs/benchmarks.md) and prints it last.
"""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F

from bench.common import bench_ms, bf16_matmul_tflops, copy_bandwidth_gbs, environment, out_dir
from telefuser.kernels.triton.modulate import modulate, norm_modulate
from telefuser.kernels.triton.norms import layer_norm, rms_norm
from telefuser.kernels.triton.residual import gated_add
from telefuser.kernels.triton.rotary import apply_rotary_emb
from telefuser.ops.attention import attention
from telefuser.ops.quantized_linear import LinearFP8, LinearInt8
from telefuser.ops.rotary import wan_rope_cos_sin

TOKENS = 32760  # 480p (832x480) x 81 frames: 21 latent frames x 30 x 52 patches
BF16 = torch.bfloat16
TEST_FILES = ("tests/test_kernels_triton.py", "tests/test_ops.py", "tests/test_ops_requirements.py",
              "tests/test_ops_quantized.py", "tests/test_ops_dispatch.py")


# PyTorch references: the same math, fp32 statistics, as a user would write it.
def ref_rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)


def ref_ln(x):
    return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6).to(x.dtype)


def ref_mod(x, shift, scale):
    return (x.float() * (1 + scale) + shift).to(x.dtype)


def ref_norm_mod(x, shift, scale):
    return (F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * (1 + scale) + shift).to(x.dtype)


def ref_gated(x, y, g):
    return (x.float() + y.float() * g).to(x.dtype)


def ref_rope(x, cos, sin):
    p = x.float().unflatten(-1, (-1, 2))
    c, s = cos[None, :, None], sin[None, :, None]
    return torch.stack((p[..., 0] * c - p[..., 1] * s, p[..., 0] * s + p[..., 1] * c), -1).flatten(-2).to(x.dtype)


def kernel_rows(copy_gbs: float) -> list[str]:
    rows = []
    for dim in (1536, 5120):
        x = torch.randn(1, TOKENS, dim, device="cuda", dtype=BF16)
        y = torch.randn_like(x)
        w = torch.randn(dim, device="cuda", dtype=BF16)
        shift, scale, gate = (torch.randn(1, 1, dim, device="cuda") for _ in range(3))
        heads = dim // 128
        q = torch.randn(1, TOKENS, heads, 128, device="cuda", dtype=BF16)
        cos, sin = wan_rope_cos_sin((21, 30, 52), 128, device="cuda")
        nbytes = x.numel() * 2
        cases = [
            ("rms_norm", lambda: rms_norm(x, w, 1e-6), lambda: ref_rms(x, w), ref_rms, (x, w), 2 * nbytes),
            ("layer_norm", lambda: layer_norm(x, None, None, 1e-6), lambda: ref_ln(x), ref_ln, (x,), 2 * nbytes),
            ("modulate", lambda: modulate(x, shift, scale), lambda: ref_mod(x, shift, scale), ref_mod, (x, shift, scale), 2 * nbytes),
            ("norm_modulate", lambda: norm_modulate(x, shift, scale, 1e-6, None, None), lambda: ref_norm_mod(x, shift, scale),
             ref_norm_mod, (x, shift, scale), 2 * nbytes),
            ("gated_add", lambda: gated_add(x, y, gate), lambda: ref_gated(x, y, gate), ref_gated, (x, y, gate), 3 * nbytes),
            ("rope (q)", lambda: apply_rotary_emb(q, cos, sin), lambda: ref_rope(q, cos, sin), ref_rope, (q, cos, sin), 2 * q.numel() * 2),
        ]
        separate = None
        for name, ours, eager, fn, args, moved in cases:
            compiled = torch.compile(fn)
            compiled(*args)
            t_ours, t_eager, t_comp = bench_ms(ours), bench_ms(eager), bench_ms(lambda: compiled(*args))
            gbs = moved / t_ours / 1e6
            ok = gbs >= 0.8 * copy_gbs and t_ours <= t_comp * 1.02
            rows.append(f"| {name} | {dim} | {t_ours * 1e3:.0f} | {gbs:.0f} ({gbs / copy_gbs:.0%}) | {t_eager * 1e3:.0f} | "
                        f"{t_comp * 1e3:.0f} | {'met' if ok else 'MISSED'} |")
            if name == "layer_norm":
                t_ln = t_ours
            if name == "modulate":
                separate = t_ln + t_ours
            if name == "norm_modulate":
                rows.append(f"| norm then modulate (2 kernels) | {dim} | {separate * 1e3:.0f} | | | | "
                            f"fused {'faster' if t_ours < separate else 'SLOWER'} ({separate / t_ours:.2f}x) |")
    return rows


def attention_rows(peak: float) -> list[str]:
    rows = []
    for heads in (12, 40):
        q, k, v = (torch.randn(1, TOKENS, heads, 128, device="cuda", dtype=BF16) for _ in range(3))
        flops = 4 * TOKENS * TOKENS * 128 * heads
        for backend in ("TORCH_SDPA", "TORCH_CUDNN"):
            try:
                ms = bench_ms(lambda: attention(q, k, v, backend), warmup=5, rep=20)
                tf = flops / ms / 1e9
                rows.append(f"| {backend} | {heads} | {ms:.2f} | {tf:.0f} | {tf / peak:.0%} |")
            except Exception as exc:  # a backend the build lacks: say so in the table
                rows.append(f"| {backend} | {heads} | - | - | unavailable: {type(exc).__name__} |")
    return rows


def fp8_rows() -> list[str]:
    rows = []
    for k, n in ((1536, 8960), (8960, 1536)):
        lin = torch.nn.Linear(k, n, device="cuda", dtype=BF16)
        x = torch.randn(TOKENS, k, device="cuda", dtype=BF16)
        t_bf16 = bench_ms(lambda: lin(x))
        flops = 2 * TOKENS * k * n
        variants = (("fp8 per-tensor", LinearFP8(lin)), ("fp8 per-row", LinearFP8(lin, rowwise=True)),
                    ("int8 per-row", LinearInt8(lin)))
        for label, layer in variants:
            t = bench_ms(lambda: layer(x))
            speedup = t_bf16 / t
            rows.append(f"| {TOKENS}x{k} -> {n} | {label} | {t_bf16 * 1e3:.0f} "
                        f"({flops / t_bf16 / 1e9:.0f} TF/s) | {t * 1e3:.0f} ({flops / t / 1e9:.0f} TF/s) | "
                        f"{speedup:.2f}x {'met' if speedup >= 1.5 else 'MISSED'} |")
    return rows


def main() -> None:
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *TEST_FILES], capture_output=True, text=True)
    print(tests.stdout[-1500:], tests.stderr[-1500:])
    copy_gbs, peak = copy_bandwidth_gbs(), bf16_matmul_tflops()
    lines = [
        f"Measured: {environment()}. Copy bandwidth {copy_gbs:.0f} GB/s (read + write), "
        f"bf16 matmul peak {peak:.0f} TFLOP/s (8192^3), both in this run. "
        f"GPU tests ({', '.join(TEST_FILES)}): {tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else 'no output'}.",
        "",
        f"Kernels, bf16, x = [1, {TOKENS}, dim] (480p x 81 frames), modulation [1, 1, dim] fp32; times in us (median):",
        "",
        "| kernel | dim | Triton us | GB/s (of copy) | eager us | torch.compile us | target (>=80% copy, <= compile) |",
        "|---|---|---|---|---|---|---|",
        *kernel_rows(copy_gbs),
        "",
        f"Attention, bf16, [1, heads, {TOKENS}, 128], FLOPs = 4 S^2 D H:",
        "",
        "| backend | heads | ms | TFLOP/s | of bf16 peak |",
        "|---|---|---|---|---|",
        *attention_rows(peak),
        "",
        "FP8 linear (torch._scaled_mm, e4m3) and INT8 linear (torch._int_mm), activation quantisation included, vs bf16 nn.Linear; times in us:",
        "",
        "| shape | quantisation | bf16 | quantised | speedup (target 1.5x) |",
        "|---|---|---|---|---|",
        *fp8_rows(),
    ]
    table = "\n".join(lines)
    (out_dir() / "ops.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
