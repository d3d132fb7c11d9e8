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

from .attention import attention, backend_name
from .quantized_attention import VARIANTS, quantized_attention_with_lse

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


def _sp_degrees(q: torch.Tensor, mesh: DeviceMesh, seq_len: Optional[int]) -> tuple[int, int, int]:
    """(Ulysses degree, ring degree, seq_len) for a local q [B, S_local, N, D], checked: the heads split evenly
    across the Ulysses ranks, and seq_len (None: no padding) within the whole sequence."""
    ulysses, ring = _degree(mesh, ULYSSES_DIM), _degree(mesh, RING_DIM)
    heads, local_len = q.shape[2], q.shape[1]
    if heads % ulysses:
        raise ValueError(f"Ulysses attention splits heads across ranks: {heads} heads are not divisible by "
                         f"sp_ulysses degree {ulysses}; choose an sp_ulysses degree that divides {heads}")
    total = local_len * ulysses * ring
    seq_len = total if seq_len is None else seq_len
    if not 0 < seq_len <= total:
        raise ValueError(f"seq_len {seq_len} must be in 1..{total} (S_local {local_len} x sequence-parallel "
                         f"degree {ulysses * ring})")
    return ulysses, ring, seq_len


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


def _block_attention(backend: str):
    """(q, k, v, scale) -> (out BSND, lse [B, N, S]) for one ring block: the quantised kernel where the backend is
    one of its variants (it returns the log-sum-exp), else the SDPA kernels of `attention_with_lse`."""
    if backend not in VARIANTS:
        return attention_with_lse

    def run(q, k, v, scale):
        out, lse = quantized_attention_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend, scale)
        return out.transpose(1, 2), lse
    return run


def _send_chunks(tensors: tuple[torch.Tensor, ...], degree: int, groups: int, g: int) -> torch.Tensor:
    """Head group g of each BSND tensor in one buffer for one all-to-all (a single copy):
    [degree, T, B, S, H/(degree*groups), D], chunk j holding the heads rank j will own."""
    parts = []
    for t in tensors:
        b, s, n, d = t.shape
        parts.append(t.reshape(b, s, degree, groups, n // (degree * groups), d)[:, :, :, g].permute(2, 0, 1, 3, 4))
    return torch.stack(parts, dim=1)


def _ulysses_overlapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, degree: int, groups: int,
                        group: dist.ProcessGroup, attend) -> torch.Tensor:
    """Ulysses attention in `groups` head groups, pipelined: while group g's attention runs, the all-to-all of
    group g+1's q, k, v (one message) and of group g-1's output are in flight (async collectives run on the
    backend's own stream, NCCL's or gloo's thread). Same result as the unchunked exchange: attention is
    independent per head. `attend(g, q, k, v)` gets the group's index too: this rank's heads of group g are
    [rank * N / degree + g * hg, + hg) of the N heads (the joint attention slices its whole tokens by it)."""
    b, s, n, d = q.shape
    hg = n // (degree * groups)  # heads per rank per group

    def exchange_inputs(g: int):
        send = _send_chunks((q, k, v), degree, groups, g)  # [degree, 3, B, S, hg, D]
        recv = torch.empty_like(send)
        return recv, dist.all_to_all_single(recv, send, group=group, async_op=True)

    out = torch.empty_like(q).reshape(b, s, degree, groups, hg, d)
    pending_inputs = exchange_inputs(0)
    pending_outputs = []
    for g in range(groups):
        recv, work = pending_inputs
        work.wait()
        if g + 1 < groups:
            pending_inputs = exchange_inputs(g + 1)  # in flight behind this group's attention
        # recv[i]: rank i's positions of my heads: [degree, 3, B, S, hg, D] -> q, k, v [B, degree*S, hg, D]
        qg, kg, vg = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, degree * s, hg, d)
        og = attend(g, qg, kg, vg)
        send = og.reshape(b, degree, s, hg, d).transpose(0, 1).contiguous()  # chunk j: rank j's positions
        back = torch.empty_like(send)
        pending_outputs.append((g, back, dist.all_to_all_single(back, send, group=group, async_op=True)))
    for g, back, work in pending_outputs:
        work.wait()
        out[:, :, :, g] = back.permute(1, 2, 0, 3, 4)  # chunk i: head slice i of my positions
    return out.reshape(b, s, n, d)


def ulysses_groups(heads: int, degree: int) -> int:
    """Head groups the Ulysses exchange is pipelined in: up to 4, each with at least one head per rank (1: the
    plain exchange, no overlap)."""
    per_rank = heads // degree
    return next(g for g in (4, 3, 2, 1) if per_rank % g == 0)


def merge_lse(out: Optional[torch.Tensor], lse: Optional[torch.Tensor], block_out: torch.Tensor,
              block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions of the same queries over disjoint key blocks -> their attention over both keys, in
    float32 (out BSND, lse [B, N, S]). `out` None: the first block. A block with no keys has lse -inf."""
    if out is None or lse is None:
        return block_out.float(), block_lse
    merged = torch.logaddexp(lse, block_lse)
    return (out * torch.exp(lse - merged).transpose(1, 2).unsqueeze(-1)
            + block_out.float() * torch.exp(block_lse - merged).transpose(1, 2).unsqueeze(-1)), merged


def _ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int, scale: Optional[float],
                    degree: int, index: int, group: dist.ProcessGroup, backend: str,
                    start: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Attention of this rank's queries over every ring rank's keys, passing K/V blocks one step a round.

    Each round posts the send of the current block to the next rank and the receive of the next block from
    the previous rank before computing on the current block, so the transfer hides behind the compute.
    Partial results merge by log-sum-exp in float32. `start`: a partial (out, lse) of the same queries over keys
    outside the ring (joint tokens whole on every rank, ops/joint_attention.py), merged first.
    """
    block_len = k.shape[1]
    send_to = dist.get_global_rank(group, (index + 1) % degree)
    recv_from = dist.get_global_rank(group, (index - 1) % degree)
    current = torch.stack((k, v)).contiguous()  # one message per round instead of two
    spare = torch.empty_like(current)  # receive buffer; reused once its previous contents were sent
    out, lse = start if start is not None else (None, None)
    block_attention = _block_attention(backend)
    for step in range(degree):
        requests = []
        if step < degree - 1:
            requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, current, send_to, group),
                                               dist.P2POp(dist.irecv, spare, recv_from, group)])
        valid = _valid_keys(seq_len, (index - step) % degree, block_len)  # the block started at rank index-step
        if valid:
            out, lse = merge_lse(out, lse, *block_attention(q, current[0, :, :valid], current[1, :, :valid], scale))
        for request in requests:
            request.wait()
        current, spare = spare, current
    assert out is not None  # ring rank 0's block always holds position 0
    return out.to(q.dtype)


@torch.compiler.disable
def long_context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, device_mesh: DeviceMesh,
                           seq_len: Optional[int] = None, attention_config: Union[str, Any, None] = None,
                           scale: Optional[float] = None, overlap: bool = True) -> torch.Tensor:
    """Full-sequence attention for q, k, v sharded along the sequence ([B, S_local, N, D] each, BSND).

    Ulysses (mesh dim "sp_ulysses") trades the sequence shard for a head slice by all-to-all, ring (mesh dim
    "sp_ring") circulates K/V blocks; with both, Ulysses runs inside each ring block (USP). `seq_len` is the
    unpadded total length (None: no padding). Returns this rank's output shard [B, S_local, N, D].

    `attention_config` picks the backend (see `telefuser.ops.attention`; None: the dispatch table's). Ulysses
    alone pipelines its all-to-alls with the attention of head groups (`overlap`, see `ulysses_groups`). The
    ring needs each block's log-sum-exp: the quantised backends (SAGE_ATTN_*) return it; every other backend
    runs the SDPA kernels of `attention_with_lse` there.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"long_context_attention takes q, k, v as [B, S_local, N, D] with equal B, S_local, N; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    ulysses, ring, seq_len = _sp_degrees(q, device_mesh, seq_len)
    heads, local_len = q.shape[2], q.shape[1]

    backend = backend_name(attention_config)
    if ulysses > 1 and ring == 1 and overlap:
        group = device_mesh.get_group(ULYSSES_DIM)
        valid = _valid_keys(seq_len, 0, local_len * ulysses)
        return _ulysses_overlapped(
            q, k, v, ulysses, ulysses_groups(heads, ulysses), group,
            lambda g, qg, kg, vg: attention(qg, kg[:, :valid], vg[:, :valid], attention_config=backend, scale=scale))
    if ulysses > 1:
        group = device_mesh.get_group(ULYSSES_DIM)
        q, k, v = (_seq_to_heads(t, ulysses, group) for t in (q, k, v))
    if ring > 1:
        out = _ring_attention(q, k, v, seq_len, scale, ring, device_mesh.get_local_rank(RING_DIM),
                              device_mesh.get_group(RING_DIM), backend)
    else:
        valid = _valid_keys(seq_len, 0, k.shape[1])
        out = attention(q, k[:, :valid], v[:, :valid], attention_config=backend, scale=scale)
    if ulysses > 1:
        out = _heads_to_seq(out, ulysses, device_mesh.get_group(ULYSSES_DIM))
    return out
