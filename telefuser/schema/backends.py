"""What each attention backend and the kernel library need: pure data, read by the compiler and ops.

The compiler decides and explains with these facts without importing ops or
the backends' packages; `telefuser.ops.attention` checks the same facts at run
time. Head-dim and dtype limits are the backends' published ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

KERNEL_PACKAGE = "triton"  # TeleFuser's fused kernels
KERNEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    description: str
    devices: tuple[str, ...] = ("cuda",)
    package: Optional[str] = None  # import name that must be installed on the target
    min_cc: Optional[tuple[int, int]] = None
    max_cc: Optional[tuple[int, int]] = None
    dtypes: tuple[str, ...] = ("bfloat16", "float16")
    head_dims: tuple[int, ...] = ()  # empty: any
    dense: bool = True  # False for sparse approximations


_HALF = ("bfloat16", "float16")
_SPARSE_DIMS = (64, 128)

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
    AttentionBackend("SAGE_ATTN_2_8_8", "SageAttention2, int8 QK / fp8 PV", package="sageattention", min_cc=(8, 0),
                     dtypes=_HALF, head_dims=(64, 128)),
    AttentionBackend("SAGE_ATTN_2_8_16", "SageAttention2, int8 QK / fp16 PV", package="sageattention", min_cc=(8, 0),
                     dtypes=_HALF, head_dims=(64, 128)),
    AttentionBackend("SAGE_ATTN_2_8_8_SM90", "SageAttention2, int8 QK / fp8 PV, Hopper kernel", package="sageattention",
                     min_cc=(9, 0), max_cc=(9, 0), dtypes=_HALF, head_dims=(64, 128)),
    AttentionBackend("SPARGE_ATTN", "SpargeAttn block-sparse attention", package="spas_sage_attn", min_cc=(8, 0),
                     dtypes=_HALF, head_dims=_SPARSE_DIMS, dense=False),
    AttentionBackend("RADIAL_ATTN", "Radial attention (energy-decay sparse mask)", package="spas_sage_attn", min_cc=(8, 0),
                     dtypes=_HALF, head_dims=_SPARSE_DIMS, dense=False),
    AttentionBackend("LOCAL_SPARSE_ATTN", "local-window block-sparse attention", package="spas_sage_attn", min_cc=(8, 0),
                     dtypes=_HALF, head_dims=_SPARSE_DIMS, dense=False),
    AttentionBackend("SOL_ATTN", "SOL sparse attention", package="sol_attn", min_cc=(9, 0), dtypes=_HALF,
                     head_dims=_SPARSE_DIMS, dense=False),
)}


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
