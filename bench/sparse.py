"""Sparse attention benchmark on one GPU: our block-sparse kernel under the Radial and local masks against dense
cuDNN attention (and against our kernel with a dense layout, its own ceiling), at Wan2.1 81 frames.

Run on the device: `PYTHONPATH=. python3 bench/sparse.py` (first runs the GPU tests of the kernel and masks).
Writes $OUT/sparse.md and prints it last. NOT RUN YET (written without a GPU): the first run is its check.

Each row: B = 1, the heads of one rank (Wan2.1 14B: 40 heads of 128; 1.3B: 12 of 128), bf16, BSND views of
one [B, S, 3, N, D] qkv tensor as the DiT makes them (strided, no copies). Before timing, the kernel's output
over the first 256 queries is compared with dense attention with the same mask applied (SDPA, float32).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import bench_ms, environment, out_dir
from telefuser.kernels.triton.block_sparse_attention import block_sparse_attention
from telefuser.ops import sparse_attention as sa

GRIDS = {"480p 81f": (21, 30, 52), "720p 81f": (21, 45, 80)}  # latent frames x patch rows x patch columns
HEADS = {"14B": 40, "1.3B": 12}
TEST_FILES = ("tests/test_block_sparse.py", "tests/test_sparse_masks.py")


def check(q, k, v, layout, mask, rows=256):
    out = block_sparse_attention(q, k, v, layout.counts, layout.indices, layout.block_size)
    bs = layout.block_size
    tokens = mask.to(q.device).repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:rows, : k.shape[1]]
    ref = F.scaled_dot_product_attention(q[:, :rows].float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), attn_mask=tokens).transpose(1, 2)
    err = ((out[:, :rows].float() - ref).norm() / ref.norm()).item()
    if err > 8e-3:
        raise SystemExit(f"block-sparse kernel off by {err:.2e} (bf16 bound 8e-3)")
    return err


def rows() -> list[str]:
    lines = ["| shape | heads | pattern | density | sparse kernel ms | dense layout ms | cuDNN dense ms | vs cuDNN | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    patterns = [("radial", SimpleNamespace(sparse_impl="radial", block_size=128, decay_factor=1.0)),
                ("local 6", SimpleNamespace(sparse_impl="local", block_size=128, local_window_size=6))]
    for shape, grid in GRIDS.items():
        s = grid[0] * grid[1] * grid[2]
        for model, heads in HEADS.items():
            qkv = torch.randn(1, s, 3, heads, 128, device="cuda", dtype=torch.bfloat16)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                dense_ms = bench_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt), warmup=5, rep=20)
            full = sa.layout_from_mask(torch.ones(sa.radial_block_mask(grid).shape, dtype=torch.bool), 128).to("cuda")
            full_ms = bench_ms(lambda: block_sparse_attention(q, k, v, full.counts, full.indices, 128), warmup=5, rep=20)
            for name, cfg in patterns:
                mask = sa.block_mask_for(cfg, grid)
                layout = sa.block_layout_for(cfg, grid, "cuda")
                err = check(q, k, v, layout, mask)
                ms = bench_ms(lambda: block_sparse_attention(q, k, v, layout.counts, layout.indices, 128),
                              warmup=5, rep=20)
                lines.append(f"| {shape} (S={s}) | {model}: {heads} x 128 | {name} | {sa.density(mask):.3f} | "
                             f"{ms:.2f} | {full_ms:.2f} | {dense_ms:.2f} | {dense_ms / ms:.2f}x | {err:.1e} |")
            del qkv
            torch.cuda.empty_cache()
    return lines


def main() -> None:
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", *TEST_FILES], capture_output=True, text=True)
    print(tests.stdout[-2000:])
    text = "\n".join([f"Sparse attention, {environment()}", "", *rows()])
    (out_dir() / "sparse.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
