"""`bench/sparse.py --step`: a whole Wan2.1-14B DiT CFG step at 720p 81f with radial attention beside dense.

One CFG step = the runtime's `guided` (two batch-1 forwards, CFG 5.0) of the 14B DiT (full-size random bf16 weights
made on the GPU, bench/weights_random), latent [1, 16, 21, 90, 160] (S = 75,600 tokens), text 512 tokens, t = 900,
with the dispatch table's Triton row kernels. Rows: TORCH_SDPA (cuDNN), RADIAL_ATTN (the 16-bit block-sparse
kernel), SAGE_ATTN_2_8_8 dense, SAGE_ATTN_2_8_8 with the radial pattern. Sparse rows run every block sparse (no
dense steps or layers: the plan's `dense_timesteps` / `dense_layers` would make some steps or blocks dense), through
the runtime's own wrapper around each block's `attend` seam. Each row: ms per step (one warm-up, then the median of
two), x the dense step, the guided output's relative L2 error against the dense step, peak GiB.
"""

from __future__ import annotations

import time
from typing import Any

RADIAL = {"sparse_impl": "radial", "block_size": 128, "decay_factor": 1.0, "local_window_size": 6,
          "dense_timesteps": 0, "dense_layers": 0}
ROWS = (("TORCH_SDPA (cuDNN)", "TORCH_SDPA", False), ("RADIAL_ATTN (16-bit block-sparse)", "RADIAL_ATTN", True),
        ("SAGE_ATTN_2_8_8 dense", "SAGE_ATTN_2_8_8", False), ("SAGE_ATTN_2_8_8 + radial", "SAGE_ATTN_2_8_8", True))


def step_rows(report: Any, smoke: bool) -> None:
    import torch

    from bench.common import TRITON_ROWS
    from bench.weights_random import wan_step_inputs
    from telefuser.distributed.rank import RankContext
    from telefuser.models.tiny import TINY_ARCH
    from telefuser.models.wan.dit import WAN21_14B, WanDiTConfig
    from telefuser.ops import sparse_attention as sa
    from telefuser.ops.dispatch import use_dispatch
    from telefuser.runtime.skip_work import _SparseWrapper  # the runtime's own seam wrapper, as a plan installs it
    from telefuser.runtime.stages.denoise import guided

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    cfg = WanDiTConfig(**{**TINY_ARCH["dit"], "dim": 128, "num_heads": 2}) if smoke else WAN21_14B
    latent = (1, 16, 9, 8, 32) if smoke else (1, 16, 21, 90, 160)
    text_len = 16 if smoke else 512
    dit, x, t, context, context_null, _ = wan_step_inputs(cfg, latent, text_len, device, dtype)
    rank = RankContext(device=torch.device(device))
    kernels = {} if smoke else TRITON_ROWS
    grid = tuple(n // p for n, p in zip(latent[2:], cfg.patch_size))
    density = sa.density(sa.block_mask_for(type("Cfg", (), RADIAL)(), grid))
    shape = f"14B DiT CFG step, 720p 81f (S={grid[0] * grid[1] * grid[2]})" if not smoke else "tiny DiT CFG step"
    dense: dict[str, Any] = {}

    def run(attention: str, sparse: bool) -> dict[str, Any]:
        wrapper = _SparseWrapper(dit, RADIAL) if sparse else None
        try:
            def step() -> torch.Tensor:
                with torch.inference_mode(), use_dispatch({"attention": attention, **kernels}):
                    return guided(dit, x, t, context, context_null, 5.0, rank, {})

            out = step().float()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(1 if smoke else 2):
                start = time.perf_counter()
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            ms = sorted(times)[len(times) // 2] * 1e3
        finally:
            if wrapper is not None:
                wrapper.detach()
        if not dense:
            dense.update(ms=ms, out=out)
        err = ((out - dense["out"]).norm() / dense["out"].norm()).item()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        return {"ms": ms, "density": density if sparse else 1.0, "x_cudnn": dense["ms"] / ms, "rel_err": err,
                "bound": f"peak {peak:.1f} GiB" if peak is not None else ""}

    for label, attention, sparse in ROWS:
        report.row({"shape": shape, "heads": "14B: 40 x 128" if not smoke else "tiny", "attention": label},
                   lambda attention=attention, sparse=sparse: run(attention, sparse))
    report.notes.append("Step rows: 'x cuDNN dense' is x the TORCH_SDPA step of the same run; 'rel err' is the "
                        "guided output's relative L2 error against that step; the last column gives the peak.")
    report.write()
