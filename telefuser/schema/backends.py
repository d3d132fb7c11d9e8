"""What each attention backend and the kernel library need: pure data, read by the compiler and ops.

The compiler decides and explains with these facts without importing ops or
the backends' packages; `telefuser.ops.attention` checks the same facts at run
time. Head-dim and dtype limits are the backends' published ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

KERNEL_PACKAGE = "triton"  # TeleFuser's fused kernels
KERNEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    description: str
    devices: tuple[str, ...] = ("cuda",)
    package: Optional[str] = None  # import name that must be installed on a CUDA target
    min_cc: Optional[tuple[int, int]] = None
    max_cc: Optional[tuple[int, int]] = None
    dtypes: tuple[str, ...] = ("bfloat16", "float16")
    head_dims: tuple[int, ...] = ()  # empty: any
    dense: bool = True  # False for sparse approximations


_HALF = ("bfloat16", "float16")
_ANY_FLOAT = ("bfloat16", "float16", "float32")
_QUANT_DIMS = (32, 64, 128)  # 8-bit tensor-core products need a head dim >= 32
_SPARSE_DIMS = (64, 128)
_BLOCK_SPARSE_DIMS = (16, 32, 64, 128, 256)  # our block-sparse kernel: a power of two 16..256

ATTENTION_BACKENDS: dict[str, AttentionBackend] = {b.name: b for b in (
    AttentionBackend("TORCH_SDPA", "torch.nn.functional.scaled_dot_product_attention (PyTorch picks cuDNN/flash/efficient/math)",
                     devices=("cpu", "cuda"), dtypes=("bfloat16", "float16", "float32")),
    AttentionBackend("TORCH_CUDNN", "PyTorch SDPA forced to the cuDNN attention kernel", min_cc=(8, 0), dtypes=_HALF),
    AttentionBackend("FLASH_ATTN_2", "FlashAttention-2 (flash_attn)", package="flash_attn", min_cc=(8, 0),
                     dtypes=_HALF, head_dims=tuple(range(8, 257, 8))),
    AttentionBackend("FLASH_ATTN_3", "FlashAttention-3 for Hopper (flash_attn_interface)", package="flash_attn_interface",
                     min_cc=(9, 0), max_cc=(9, 0), dtypes=_HALF, head_dims=(64, 96, 128, 192, 256)),
    AttentionBackend("FLASH_ATTN_4", "FlashAttention-4 (CuTe DSL, flash_attn.cute)", package="flash_attn.cute",
                     min_cc=(9, 0), dtypes=_HALF, head_dims=(64, 96, 128)),
    # TeleFuser's own SageAttention2-style Triton kernel (telefuser/kernels/triton/sage_attention.py): INT8 Q·K^T
    # (K smoothed, per-token scales). On the CPU the same arithmetic runs in PyTorch (no Triton needed there).
    AttentionBackend("SAGE_ATTN_2_8_8", "TeleFuser Triton: INT8 Q·K^T, FP8 e4m3 P·V, FP32 accumulation",
                     devices=("cpu", "cuda"), package=KERNEL_PACKAGE,
                     min_cc=(8, 9), dtypes=_ANY_FLOAT, head_dims=_QUANT_DIMS),
    AttentionBackend("SAGE_ATTN_2_8_16", "TeleFuser Triton: INT8 Q·K^T, P·V in bf16/fp16, FP32 accumulation",
                     devices=("cpu", "cuda"), package=KERNEL_PACKAGE, min_cc=(8, 0), dtypes=_ANY_FLOAT,
                     head_dims=_QUANT_DIMS),
    AttentionBackend("SAGE_ATTN_2_8_8_SM90", "TeleFuser Triton: INT8 Q·K^T, FP8 e4m3 P·V, FP32 accumulation, "
                     "at the block sizes measured fastest on Hopper; Hopper only", devices=("cpu", "cuda"), package=KERNEL_PACKAGE,
                     min_cc=(9, 0), dtypes=_ANY_FLOAT, head_dims=_QUANT_DIMS),
    AttentionBackend("SPARGE_ATTN", "SpargeAttn block-sparse attention", package="spas_sage_attn", min_cc=(8, 0),
                     dtypes=_HALF, head_dims=_SPARSE_DIMS, dense=False),
    # TeleFuser's own block-sparse Triton kernel (telefuser/kernels/triton/block_sparse_attention.py) over the masks
    # of telefuser/ops/sparse_attention.py; on the CPU its PyTorch reference (the kernel under TRITON_INTERPRET=1).
    AttentionBackend("RADIAL_ATTN", "TeleFuser Triton block-sparse attention, Radial Attention's mask (energy decay "
                     "with temporal distance)", devices=("cpu", "cuda"), package=KERNEL_PACKAGE, min_cc=(8, 0),
                     dtypes=_ANY_FLOAT, head_dims=_BLOCK_SPARSE_DIMS, dense=False),
    AttentionBackend("LOCAL_SPARSE_ATTN", "TeleFuser Triton block-sparse attention, a local 3-D window mask",
                     devices=("cpu", "cuda"), package=KERNEL_PACKAGE, min_cc=(8, 0), dtypes=_ANY_FLOAT,
                     head_dims=_BLOCK_SPARSE_DIMS, dense=False),
    AttentionBackend("SSTA_ATTN", "TeleFuser Triton block-sparse attention, HunyuanVideo-1.5's SSTA (sliding tile "
                     "window + top-k tiles by importance, chosen per call)", devices=("cpu", "cuda"),
                     package=KERNEL_PACKAGE, min_cc=(8, 0), dtypes=_ANY_FLOAT, head_dims=_BLOCK_SPARSE_DIMS, dense=False),
    AttentionBackend("SOL_ATTN", "SOL sparse attention", package="sol_attn", min_cc=(9, 0), dtypes=_HALF,
                     head_dims=_SPARSE_DIMS, dense=False),
)}


def attention_problems(spec: AttentionBackend, device: str, cc: Optional[tuple[int, int]], dtype: str,
                       head_dim: Optional[int], packages: Optional[Sequence[str]] = None) -> list[str]:
    """Why backend `spec` cannot run (empty when it can): the one rule, used by the compiler on a described
    target and by ops on real tensors. `cc` None: unknown (not checked); `packages` None: not checked
    (ops imports the package instead, which names it when missing)."""
    problems = []
    if device not in spec.devices:
        problems.append(f"runs on {'/'.join(spec.devices)}, not {device}")
    if device == "cuda" and cc is not None:
        if spec.min_cc and cc < spec.min_cc:
            problems.append(f"needs compute capability >= {'.'.join(map(str, spec.min_cc))}, "
                            f"the GPU has {'.'.join(map(str, cc))}")
        if spec.max_cc and cc > spec.max_cc:
            problems.append(f"needs compute capability <= {'.'.join(map(str, spec.max_cc))}, "
                            f"the GPU has {'.'.join(map(str, cc))}")
    if device == "cuda" and packages is not None and spec.package and spec.package not in packages:
        problems.append(f"needs the package {spec.package!r}, not installed on the target (target.packages)")
    if spec.dtypes and dtype not in spec.dtypes:
        problems.append(f"supports {', '.join(spec.dtypes)}, not {dtype}")
    if spec.head_dims and head_dim is not None and head_dim not in spec.head_dims:
        problems.append(f"supports head dims {spec.head_dims}, not {head_dim}")
    return problems


@dataclass(frozen=True)
class KernelSpec:
    """What one of TeleFuser's Triton kernels accepts; outside it the op runs its native PyTorch path."""

    op: str  # the dispatch table's key
    description: str
    package: str = KERNEL_PACKAGE
    min_cc: tuple[int, int] = (8, 0)  # bf16 loads/stores and the block sizes tuned on Ampere and later
    dtypes: tuple[str, ...] = KERNEL_DTYPES
    max_width: int = 16384  # the last dim; a whole row lives in registers, longer ones would spill


KERNELS: dict[str, KernelSpec] = {k.op: k for k in (
    KernelSpec("rms_norm", "RMSNorm over the last dim, fp32 statistics"),
    KernelSpec("layer_norm", "LayerNorm with or without affine, fp32 statistics"),
    KernelSpec("modulate", "x * (1 + scale) + shift, shift/scale broadcast per sample or per token"),
    KernelSpec("norm_modulate", "LayerNorm then modulate in one pass"),
    KernelSpec("gated_add", "x + gate * y, gate broadcast per sample or per token"),
    KernelSpec("rotary", "Wan 3-D RoPE on q or k [B, S, N, D] (last dim: an even head dim)", max_width=512),
)}
