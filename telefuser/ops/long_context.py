"""Sequence-parallel attention over a sequence sharded across ranks (Ulysses, ring, and both: USP).

Layout conventions:

- Tensors are "BSND": [batch, sequence, heads, head_dim]. Each rank passes its own shard [B, S_local, N, D];
  every sequence-parallel rank holds the same S_local, because the caller pads the full sequence at its END
  to a multiple of the sequence-parallel world size. `seq_len` is the true (unpadded) total length.
- The sequence-parallel rank is sp_rank = ring_index * ulysses_degree + ulysses_index (ring outer, Ulysses
  inner) and holds positions [sp_rank * S_local, (sp_rank + 1) * S_local). So one Ulysses group holds a
  contiguous run of U * S_local positions, and ring rank j holds the j-th such run.
- The degrees come from the mesh dims named "sp_ulysses" and "sp_ring"; a missing dim means degree 1 and
  every other dim ("cfg", "dp", "tp", ...) is ignored.
- Log-sum-exp tensors are [B, N, S] float32, natural log, of the scaled scores.

Padded keys are dropped by slicing each key/value block to its valid length rather than by a mask: padding
sits at the end of the full sequence, so a block's valid length follows from seq_len alone, and mask-free
attention keeps the fused kernels usable. Padded query rows get finite garbage that the caller discards.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .attention import attention

ULYSSES_DIM = "sp_ulysses"
RING_DIM = "sp_ring"


def _math_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in float32 (or float64 for float64 inputs), for where no fused op returns the LSE."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bsnd,btnd->bnst", q.to(dtype), k.to(dtype)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bnst,btnd->bsnd", torch.exp(scores - lse.unsqueeze(-1)), v.to(dtype))
    return out.to(q.dtype), lse.float()


def _cuda_kernel(q: torch.Tensor) -> str:
    """Which fused CUDA op accepts q; mirrors the checks torch's SDPA applies before choosing each kernel."""
    capability = torch.cuda.get_device_capability(q.device)
    head_dim = q.shape[-1]
    half = q.dtype in (torch.float16, torch.bfloat16)
    # cuDNN's fused attention is SDPA's own choice on Hopper and 1.6x faster there than flash (FA2) for Wan's
    # shapes (docs/benchmarks.md); it returns the log-sum-exp too.
    if half and capability >= (9, 0) and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    if half and capability >= (8, 0) and head_dim % 8 == 0 and head_dim <= 256:
        return "flash"
    # Memory-efficient attention needs 16-byte aligned rows and, for bf16, Ampere or newer.
    if ((half or q.dtype == torch.float32) and head_dim % (16 // q.element_size()) == 0
            and (q.dtype != torch.bfloat16 or capability >= (8, 0))):
        return "efficient"
    return "math"


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v over BSND tensors, with its log-sum-exp.

    Returns (out [B, S, N, D] in q's dtype, lse [B, N, S] float32, natural log). The LSE is what lets partial
    results over disjoint key blocks be merged exactly (ring attention). Needs at least one key.
    """
    if k.shape[1] == 0:
        raise ValueError("attention_with_lse needs at least one key; skip blocks whose keys are all padding")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BNSD views, as the SDPA ops take
    if q.is_cuda:
        kernel = _cuda_kernel(q)
        if kernel == "cudnn":
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False,
                                                                          scale=scale)[:2]
            lse = lse.reshape(lse.shape[:3])  # cuDNN returns it as [B, N, S, 1]
        elif kernel == "flash":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False,
                                                                          scale=scale)[:2]
        elif kernel == "efficient":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, False,
                                                                              scale=scale)[:2]
            lse = lse[..., :q.shape[1]]  # CUDA pads the LSE's sequence dim to a multiple of 32
        else:
            return _math_attention_with_lse(q, k, v, scale)
        return out.transpose(1, 2), lse.float()
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, scale=scale)
        return out.transpose(1, 2), lse.float()
    return _math_attention_with_lse(q, k, v, scale)


def _degree(mesh: DeviceMesh, name: str) -> int:
    names = mesh.mesh_dim_names or ()
    return mesh.size(names.index(name)) if name in names else 1


def _valid_keys(seq_len: int, block: int, block_len: int) -> int:
    """How many of block `block`'s positions lie before seq_len (padding is only at the sequence end)."""
    return max(0, min(block_len, seq_len - block * block_len))


def _seq_to_heads(x: torch.Tensor, degree: int, group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all [B, S, N, D] -> [B, degree * S, N / degree, D]: the group's whole sequence, a slice of heads."""
    b, s, n, d = x.shape
    send = x.reshape(b, s, degree, n // degree, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk j: heads for rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # chunk i of recv: rank i's positions of my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, degree * s, n // degree, d)


def _heads_to_seq(x: torch.Tensor, degree: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of _seq_to_heads: [B, degree * S, N / degree, D] -> [B, S, N, D]."""
    b, full, h, d = x.shape
    s = full // degree
    send = x.reshape(b, degree, s, h, d).permute(1, 0, 2, 3, 4).contiguous()  # chunk j: rank j's positions
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # chunk i of recv: head slice i of my positions
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, degree * h, d)


def _ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int, scale: Optional[float],
                    degree: int, index: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Attention of this rank's queries over every ring rank's keys, passing K/V blocks one step a round.

    Each round posts the send of the current block to the next rank and the receive of the next block from
    the previous rank before computing on the current block, so the transfer hides behind the compute.
    Partial results merge by log-sum-exp in float32.
    """
    block_len = k.shape[1]
    send_to = dist.get_global_rank(group, (index + 1) % degree)
    recv_from = dist.get_global_rank(group, (index - 1) % degree)
    current = torch.stack((k, v)).contiguous()  # one message per round instead of two
    spare = torch.empty_like(current)  # receive buffer; reused once its previous contents were sent
    out: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    for step in range(degree):
        requests = []
        if step < degree - 1:
            requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, current, send_to, group),
                                               dist.P2POp(dist.irecv, spare, recv_from, group)])
        valid = _valid_keys(seq_len, (index - step) % degree, block_len)  # the block started at rank index-step
        if valid:
            block_out, block_lse = attention_with_lse(q, current[0, :, :valid], current[1, :, :valid], scale)
            if out is None:
                out, lse = block_out.float(), block_lse
            else:
                merged = torch.logaddexp(lse, block_lse)
                out = (out * torch.exp(lse - merged).transpose(1, 2).unsqueeze(-1)
                       + block_out.float() * torch.exp(block_lse - merged).transpose(1, 2).unsqueeze(-1))
                lse = merged
        for request in requests:
            request.wait()
        current, spare = spare, current
    assert out is not None  # ring rank 0's block always holds position 0
    return out.to(q.dtype)


@torch.compiler.disable
def long_context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, device_mesh: DeviceMesh,
                           seq_len: Optional[int] = None, attention_config: Union[str, Any, None] = None,
                           scale: Optional[float] = None) -> torch.Tensor:
    """Full-sequence attention for q, k, v sharded along the sequence ([B, S_local, N, D] each, BSND).

    Ulysses (mesh dim "sp_ulysses") trades the sequence shard for a head slice by all-to-all, ring (mesh dim
    "sp_ring") circulates K/V blocks; with both, Ulysses runs inside each ring block (USP). `seq_len` is the
    unpadded total length (None: no padding). Returns this rank's output shard [B, S_local, N, D].

    `attention_config` picks the backend (see `telefuser.ops.attention`) when the ring degree is 1; the ring
    needs each block's log-sum-exp, so it always runs the SDPA kernels of `attention_with_lse`.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"long_context_attention takes q, k, v as [B, S_local, N, D] with equal B, S_local, N; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    ulysses, ring = _degree(device_mesh, ULYSSES_DIM), _degree(device_mesh, RING_DIM)
    heads, local_len = q.shape[2], q.shape[1]
    if heads % ulysses:
        raise ValueError(f"Ulysses attention splits heads across ranks: {heads} heads are not divisible by "
                         f"sp_ulysses degree {ulysses}; choose an sp_ulysses degree that divides {heads}")
    total = local_len * ulysses * ring
    seq_len = total if seq_len is None else seq_len
    if not 0 < seq_len <= total:
        raise ValueError(f"seq_len {seq_len} must be in 1..{total} (S_local {local_len} x sequence-parallel "
                         f"degree {ulysses * ring})")

    if ulysses > 1:
        # One all-to-all each: stacking q, k, v into one was measured no faster (the stacking copy costs what the
        # saved launches gain; 2 x H200, 1.3B 480p, 2026-11-23).
        group = device_mesh.get_group(ULYSSES_DIM)
        q, k, v = (_seq_to_heads(t, ulysses, group) for t in (q, k, v))
    if ring > 1:
        out = _ring_attention(q, k, v, seq_len, scale, ring, device_mesh.get_local_rank(RING_DIM),
                              device_mesh.get_group(RING_DIM))
    else:
        valid = _valid_keys(seq_len, 0, k.shape[1])
        out = attention(q, k[:, :valid], v[:, :valid], attention_config=attention_config, scale=scale)
    if ulysses > 1:
        out = _heads_to_seq(out, ulysses, device_mesh.get_group(ULYSSES_DIM))
    return out
