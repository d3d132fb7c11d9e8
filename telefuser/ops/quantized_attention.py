"""Quantised attention (SageAttention2 manner): the Triton kernel where it runs, the same arithmetic in PyTorch elsewhere.

`quantized_attention(q, k, v, variant, ...)` runs `telefuser.kernels.triton.sage_attention` on CUDA tensors
and under Triton's interpreter, and `reference_quantized_attention` otherwise (the CPU path of the tiny
plans): K smoothed by its per-head mean, 8-bit Q and K with float32 scales (per token for Q, per block of
128 keys for K), P and V in FP8 e4m3
(V per channel, P shifted into e4m3's range) or P in 16 bits, float32 accumulation. The reference uses each
row's final maximum where the kernel uses the running one, so the two agree to rounding, not bit for bit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

E4M3_MAX = 448.0
INT8_MAX = 127.0
QUERY_CHUNK = 1024  # queries per step of the reference: bounds its [chunk, S] score matrix
K_SCALE_BLOCK = 128  # keys per K scale, as the kernel (its QUANT_BLOCK)
# Cross-attention over a short key sequence (a DiT's 512 text or 257 image tokens) stays exact: its cost is
# a few percent of self-attention's, and quantising its keys on every call would cost more than it saves.
SHORT_CROSS_KEYS = 2048


@dataclass(frozen=True)
class QuantizedVariant:
    """Which products run in 8 bits."""

    pv_fp8: bool  # P·V in FP8 e4m3 (else P in bf16/fp16 and V as given)
    qk_fp8: bool = False  # Q·K^T in FP8 e4m3 (else INT8)


VARIANTS = {
    "SAGE_ATTN_2_8_8": QuantizedVariant(pv_fp8=True),
    "SAGE_ATTN_2_8_16": QuantizedVariant(pv_fp8=False),
    "SAGE_ATTN_2_8_8_SM90": QuantizedVariant(pv_fp8=True),
}


def _quantize_rows(x: torch.Tensor, fp8: bool, block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit values (as float32) and scales, one per `block` consecutive tokens of dim -2 (from token 0):
    x ~= values * scale[..., None]."""
    amax = x.abs().amax(dim=-1)
    if block > 1:
        tokens = x.shape[-2]
        padded = torch.nn.functional.pad(amax, (0, -tokens % block))
        amax = padded.unflatten(-1, (-1, block)).amax(dim=-1).repeat_interleave(block, dim=-1)[..., :tokens]
    amax = amax.clamp(min=1e-8)
    if fp8:
        scale = amax / E4M3_MAX
        return (x / scale[..., None]).to(torch.float8_e4m3fn).float(), scale
    scale = amax / INT8_MAX
    y = x / scale[..., None]
    return torch.trunc(y + 0.5 * torch.sign(y)), scale  # round half away from zero, as the kernel


def reference_quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv_fp8: bool,
                                  scale: Optional[float] = None, qk_fp8: bool = False, return_lse: bool = False,
                                  block_mask: Optional[torch.Tensor] = None, block_size: int = 128):
    """BNSD q, k, v -> BNSD output in q's dtype: quantise, dequantise, attend (the kernel's arithmetic); with
    `return_lse` also the natural-log log-sum-exp of the scaled scores, [B, N, Sq] float32. `block_mask`
    ([Mq, Mk] or [N, Mq, Mk] bool at `block_size` tokens): the block-sparse kernel's arithmetic, each query
    attending only to its block row's key blocks (rows attending nothing: output 0, lse -inf)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    block_mask = None if block_mask is None else block_mask.to(q.device)
    kf = k.float()
    k_mean = kf.mean(dim=2, keepdim=True)
    kq, k_scale = _quantize_rows(kf - k_mean, qk_fp8, K_SCALE_BLOCK)
    if pv_fp8:
        v_scale = v.float().abs().amax(dim=2, keepdim=True).clamp(min=1e-8) / E4M3_MAX  # per channel
        vq = (v.float() / v_scale).to(torch.float8_e4m3fn).float()
    else:
        vq = v.to(torch.float16 if v.dtype == torch.float16 else torch.bfloat16).float()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[2], QUERY_CHUNK):
        qq, q_scale = _quantize_rows(q[:, :, start:start + QUERY_CHUNK].float(), qk_fp8)
        s = (qq @ kq.transpose(-1, -2)) * (q_scale * scale * math.log2(math.e))[..., None] * k_scale[..., None, :]
        if block_mask is not None:
            s = s.masked_fill(~_token_mask(block_mask, block_size, start, s.shape[-2], s.shape[-1]), float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # a row attending nothing: p = 0 below
        shift = row_max - (math.log2(E4M3_MAX) if pv_fp8 else 0.0)
        p = torch.exp2(s - shift)
        denom = p.sum(dim=-1, keepdim=True)
        p16 = torch.float16 if v.dtype == torch.float16 else torch.bfloat16
        p = p.to(torch.float8_e4m3fn if pv_fp8 else p16).float()
        o = (p @ vq) / denom.clamp(min=torch.finfo(torch.float32).tiny)  # an empty row: 0 / tiny = 0
        out[:, :, start:start + QUERY_CHUNK] = (o * v_scale if pv_fp8 else o).to(q.dtype)
        lse[:, :, start:start + QUERY_CHUNK] = (shift + torch.log2(denom)).squeeze(-1) * math.log(2)
    if not return_lse:
        return out
    # the smoothing removed q·mean(k) from every score of a row: added back, as the kernel does
    return out, lse + (q.float() @ k_mean.transpose(-1, -2)).squeeze(-1) * scale


def _token_mask(block_mask: torch.Tensor, block_size: int, start: int, rows: int, keys: int) -> torch.Tensor:
    """Rows start .. start + rows of a block mask expanded to tokens: [H or 1, rows, keys] bool."""
    mask = block_mask if block_mask.dim() == 3 else block_mask[None]
    row_blocks = torch.arange(start, start + rows, device=mask.device) // block_size
    return mask[:, row_blocks].repeat_interleave(block_size, dim=-1)[..., :keys]


def runs_kernel(q: torch.Tensor) -> bool:
    """The Triton kernel runs on CUDA tensors, and on any tensor under Triton's interpreter (CI)."""
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str,
                        scale: Optional[float] = None) -> torch.Tensor:
    """BNSD attention with the named variant (`VARIANTS`), on the kernel or the reference."""
    if k.shape[2] != q.shape[2] and k.shape[2] <= SHORT_CROSS_KEYS:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return quantized_attention_with_lse(q, k, v, variant, scale, return_lse=False)


def quantized_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str,
                                 scale: Optional[float] = None, return_lse: bool = True):
    """BNSD attention with the named variant and (by default) its log-sum-exp [B, N, Sq] float32, which ring
    attention merges blocks with."""
    spec = VARIANTS[variant]
    if runs_kernel(q):
        from telefuser.kernels.triton.sage_attention import sage_attention

        return sage_attention(q, k, v, pv_fp8=spec.pv_fp8, qk_fp8=spec.qk_fp8, layout="BNSD", scale=scale,
                              return_lse=return_lse)
    return reference_quantized_attention(q, k, v, spec.pv_fp8, scale, spec.qk_fp8, return_lse=return_lse)
