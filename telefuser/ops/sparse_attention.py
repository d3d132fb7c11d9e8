"""Sparse self-attention over video tokens: the block masks (Radial Attention, a local 3-D window), their
density, and `sparse_attention`, which runs our block-sparse Triton kernel (CUDA, or the interpreter) or its
PyTorch reference (CPU).

Tokens are in Wan's (frame, height, width) order over the latent patch grid `grid = (F, H, W)`, in blocks of
`block_size` consecutive tokens. The masks' rules and their sources are in `telefuser.schema.block_masks`, their
one builder (numpy, shared with the compiler's density); here they become tensors and the kernel's layout, both
cached per (grid, pattern): never built per step or per layer.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch

from telefuser.schema import block_masks
from telefuser.schema.block_masks import Grid


class BlockLayout(NamedTuple):
    """Which key blocks each query block computes; built once per mask (`layout_from_mask`)."""

    counts: torch.Tensor  # int32 [H, Mq]: computed key blocks per query block (H = 1: shared by every head)
    indices: torch.Tensor  # int32 [H, Mq, max(1, max count)]: their indices, ascending, padded with 0
    block_size: int  # tokens per block, for queries and keys alike
    shape: tuple[int, int]  # (Mq, Mk): blocks along the queries and the keys

    def to(self, device: torch.device | str) -> "BlockLayout":
        return BlockLayout(self.counts.to(device), self.indices.to(device), self.block_size, self.shape)


def layout_from_mask(block_mask: torch.Tensor, block_size: int) -> BlockLayout:
    """The layout of a boolean block mask [Mq, Mk] (every head alike) or [H, Mq, Mk] (one per head)."""
    if block_mask.dtype != torch.bool or block_mask.dim() not in (2, 3):
        raise ValueError(f"a block mask is a bool tensor [Mq, Mk] or [heads, Mq, Mk], got {block_mask.dtype} "
                         f"{tuple(block_mask.shape)}")
    mask = block_mask if block_mask.dim() == 3 else block_mask[None]
    h, mq, mk = mask.shape
    counts = mask.sum(-1, dtype=torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    # Stable sort of (not selected) puts the selected key blocks first, in ascending order.
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width].to(torch.int32)
    keep = torch.arange(width, device=mask.device)[None, None, :] < counts[..., None]
    indices = torch.where(keep, order, torch.zeros_like(order)).contiguous()
    return BlockLayout(counts.contiguous(), indices, int(block_size), (mq, mk))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q [B, Sq, N, D] and k, v [B, Sk, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    mq, mk = math.ceil(q.shape[1] / layout.block_size), math.ceil(k.shape[1] / layout.block_size)
    if layout.shape != (mq, mk):
        raise ValueError(f"the layout has {layout.shape} blocks of {layout.block_size} tokens, the sequences "
                         f"({q.shape[1]} queries, {k.shape[1]} keys) need {(mq, mk)}")
    if layout.counts.shape[0] not in (1, q.shape[2]):
        raise ValueError(f"a per-head layout needs one mask per head ({q.shape[2]}), got {layout.counts.shape[0]}")


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                     scale: Optional[float] = None, return_lse: bool = False):
    """The kernel's semantics in PyTorch (float32 math): softmax over the listed key blocks only. One query
    block at a time, so memory is [B, N, block_size, Sk] scores, never [Sq, Sk]."""
    _check(q, k, v, layout)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bs, sq, sk = layout.block_size, q.shape[1], k.shape[1]
    block_mask = _mask_of(layout, q.device)  # [H, Mq, Mk]
    kf, vf = (t.float().transpose(1, 2) for t in (k, v))  # [B, N, Sk, D]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[2], sq, dtype=torch.float32, device=q.device)
    for m in range(layout.shape[0]):
        rows = slice(m * bs, min((m + 1) * bs, sq))
        keys = block_mask[:, m].repeat_interleave(bs, -1)[:, None, :sk]  # [H, 1, Sk]
        scores = (q[:, rows].float().transpose(1, 2) @ kf.transpose(-1, -2)) * scale  # [B, N, rows, Sk]
        scores = scores.masked_fill(~keys[None], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf where the block computes nothing
        finite = torch.isfinite(row_lse)[..., None]
        probs = torch.where(finite, torch.exp(scores - torch.where(finite, row_lse[..., None], 0.0)), 0.0)
        out[:, rows] = (probs @ vf).transpose(1, 2).to(q.dtype)
        lse[:, :, rows] = row_lse
    return (out, lse) if return_lse else out


def _mask_of(layout: BlockLayout, device: torch.device) -> torch.Tensor:
    """The boolean block mask [H, Mq, Mk] a layout lists."""
    h, (mq, mk) = layout.counts.shape[0], layout.shape
    width = layout.indices.shape[-1]
    counts, indices = layout.counts.to(device), layout.indices.to(device).long()
    listed = torch.arange(width, device=device)[None, None, :] < counts[..., None]
    hits = torch.zeros(h, mq, mk + 1, dtype=torch.int32, device=device)  # column mk takes the padding
    hits.scatter_add_(2, torch.where(listed, indices, mk), listed.to(torch.int32))
    return hits[..., :mk] > 0


MaskKey = tuple[Optional[str], Grid, int, float, int]


def _key(impl: Optional[str], grid: Grid, block_size: int, decay_factor: float, window: int) -> MaskKey:
    """The cache key of a pattern: only the parameter the pattern reads, so equal masks share one entry."""
    return (impl, tuple(int(x) for x in grid), int(block_size),  # type: ignore[return-value]
            float(decay_factor) if impl == "radial" else 1.0, int(window) if impl == "local" else 0)


def _config_key(config: Any, grid: Grid) -> MaskKey:
    return _key(getattr(config, "sparse_impl", None), grid, getattr(config, "block_size", 128),
                getattr(config, "decay_factor", 1.0), getattr(config, "local_window_size", 0))


@functools.lru_cache(maxsize=32)
def _mask(impl: Optional[str], grid: Grid, block_size: int, decay_factor: float, window: int) -> torch.Tensor:
    """`telefuser.schema.block_masks` builds (and checks) every mask; here it becomes a tensor once per pattern."""
    return torch.from_numpy(np.array(block_masks.block_mask(impl, grid, block_size, decay_factor, window)))


def radial_block_mask(grid: Grid, block_size: int = 128, decay_factor: float = 1.0) -> torch.Tensor:
    """The Radial Attention block mask [M, M] over a (frames, height, width) token grid (cached; read-only:
    clone it before changing it)."""
    return _mask(*_key("radial", grid, block_size, decay_factor, 0))


def local_block_mask(grid: Grid, block_size: int = 128, local_window_size: int = 6) -> torch.Tensor:
    """The local-window block mask [M, M]: `local_window_size` tokens per side along frame, height and width
    (cached; read-only)."""
    return _mask(*_key("local", grid, block_size, 1.0, local_window_size))


def density(mask: torch.Tensor) -> float:
    """Fraction of the block pairs a block mask computes (1.0 = dense; `block_masks.density`)."""
    return block_masks.density(mask.detach().cpu().numpy())


def block_mask_for(config: Any, grid: Grid) -> torch.Tensor:
    """The block mask a sparse config asks for: `sparse_impl` "radial" (`decay_factor`) or "local"
    (`local_window_size`), at `block_size` (attributes of `SparseAttentionConfig`, or any object with them)."""
    return _mask(*_config_key(config, grid))


@functools.lru_cache(maxsize=32)
def _layout(key: MaskKey, device: str) -> BlockLayout:
    return layout_from_mask(_mask(*key), key[2]).to(device)


def block_layout_for(config: Any, grid: Grid, device: torch.device | str = "cpu") -> BlockLayout:
    """The kernel's layout (counts + indices) for a sparse config and grid, on `device`; cached per (pattern,
    grid, device), so every layer and step reuses one."""
    return _layout(_config_key(config, grid), str(torch.device(device)))


def use_dense(step_index: int, layer_index: int, config: Any) -> bool:
    """Whether this step and block run dense attention: the first `dense_timesteps` steps and the first
    `dense_layers` blocks do (0-based indices; Radial Attention's `numeral_timestep < dense_timestep or
    layer_idx < dense_block`). No sparse config (None, or no `sparse_impl`): dense."""
    if config is None or getattr(config, "sparse_impl", None) is None:
        return True
    return (step_index < int(getattr(config, "dense_timesteps", 0))
            or layer_index < int(getattr(config, "dense_layers", 0)))


def kernel_available(q: torch.Tensor) -> bool:
    """The Triton kernel runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.disable
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Optional[torch.Tensor] = None,
                     layout: Optional[BlockLayout] = None, block_size: int = 128, scale: Optional[float] = None,
                     return_lse: bool = False, use_kernel: Optional[bool] = None, seq_len: Optional[int] = None,
                     quantized: Optional[str] = None):
    """Block-sparse attention over q [B, Sq, N, D], k, v [B, Sk, N, D] (BSND): each query block attends to the
    key blocks of `block_mask` ([Mq, Mk] or [N, Mq, Mk] bool, at `block_size` tokens) or of a prebuilt
    `layout` (preferred: build it once with `block_layout_for`). The Triton kernel where it runs
    (`kernel_available`), else the PyTorch reference; `use_kernel` forces either. `seq_len`: the true length of
    a self-attention sequence padded at its end (sequence parallel pads to a multiple of its degree): the
    first `seq_len` tokens attend among themselves (views, no copies) and the padded rows get 0 (lse -inf).
    `quantized`: a SAGE_ATTN_* variant (`telefuser.ops.quantized_attention.VARIANTS`): the quantised kernel's
    block-sparse mode (or its PyTorch reference) instead of the 16-bit kernel.
    Returns out [B, Sq, N, D] in q's dtype, and with `return_lse` also the log-sum-exp [B, N, Sq] float32."""
    if (block_mask is None) == (layout is None):
        raise ValueError("pass exactly one of block_mask and layout")
    if layout is None:
        layout = layout_from_mask(block_mask, block_size)
    if seq_len is not None and seq_len < q.shape[1]:
        if q.shape[1] != k.shape[1]:
            raise ValueError("seq_len is for self-attention over one padded sequence (as many keys as queries)")
        inner = sparse_attention(q[:, :seq_len], k[:, :seq_len], v[:, :seq_len], layout=layout, scale=scale,
                                 return_lse=return_lse, use_kernel=use_kernel, quantized=quantized)
        out = q.new_zeros(q.shape)
        out[:, :seq_len] = inner[0] if return_lse else inner
        if not return_lse:
            return out
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
        lse[..., :seq_len] = inner[1]
        return out, lse
    if use_kernel is None:
        use_kernel = kernel_available(q)
    if quantized is not None:
        return _quantized_sparse(q, k, v, layout, scale, return_lse, use_kernel, quantized)
    if use_kernel:
        from telefuser.kernels.triton.block_sparse_attention import block_sparse_attention

        layout = layout.to(q.device)
        return block_sparse_attention(q, k, v, layout.counts, layout.indices, layout.block_size, scale=scale,
                                      return_lse=return_lse)
    return block_sparse_attention_reference(q, k, v, layout, scale=scale, return_lse=return_lse)


def _quantized_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: Optional[float],
                      return_lse: bool, use_kernel: bool, variant: str):
    """The quantised block-sparse kernel (BSND) or, off the kernel, the same arithmetic in PyTorch (BNSD)."""
    from .quantized_attention import VARIANTS, reference_quantized_attention

    _check(q, k, v, layout)
    spec = VARIANTS[variant]
    if use_kernel:
        from telefuser.kernels.triton.sage_sparse_attention import sage_sparse_attention

        layout = layout.to(q.device)
        return sage_sparse_attention(q, k, v, layout.counts, layout.indices, layout.block_size, spec.pv_fp8,
                                     scale=scale, qk_fp8=spec.qk_fp8, return_lse=return_lse)
    res = reference_quantized_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spec.pv_fp8, scale,
                                        spec.qk_fp8, return_lse, _mask_of(layout, q.device), layout.block_size)
    return (res[0].transpose(1, 2), res[1]) if return_lse else res.transpose(1, 2)


def sparse_or_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Any, grid: Grid,
                              step_index: int, layer_index: int, dense: Callable[..., torch.Tensor],
                              seq_len: Optional[int] = None, use_kernel: Optional[bool] = None) -> torch.Tensor:
    """One self-attention call of a DiT under a sparse config: `dense(q, k, v)` on the dense steps and layers
    (`use_dense`), else the config's pattern over the (frames, height, width) token `grid` with the cached
    layout. q, k, v [B, S, N, D]; `seq_len` as in `sparse_attention` (default: the grid's token count when
    q is longer, i.e. padded); `use_kernel` as in `sparse_attention`."""
    if use_dense(step_index, layer_index, config):
        return dense(q, k, v)
    tokens = grid[0] * grid[1] * grid[2]
    if q.shape[1] < tokens:
        raise ValueError(f"sparse attention over a grid of {tokens} tokens got {q.shape[1]} queries: a sequence "
                         "shard (ring attention) cannot take a global mask; use Ulysses (whole sequences per rank)")
    layout = block_layout_for(config, grid, q.device)
    return sparse_attention(q, k, v, layout=layout, seq_len=tokens if seq_len is None else seq_len,
                            use_kernel=use_kernel)
