"""`apply_tensor_parallel_hy15(model, mesh)`: Megatron-style tensor parallelism of an unchanged HunyuanVideo-1.5 DiT
(`HunyuanVideo15DiT`, base or SR) over the mesh's "tp" dimension, with the styles of `tensor_parallel` (Wan's):

- each double-stream block's two streams (img_*, txt_*): q, k, v `ColwiseParallel` (each tp rank holds heads / tp
  whole heads; the block's `heads` is set to that local count so `_heads` unflattens the local slice), the
  attention projection `RowwiseParallel` (one all-reduce); MLP fc1 column-wise as plain local rows
  (`LocalColwiseParallel`: `linear_gelu_tanh` reads its weight directly), fc2 `RowwiseParallel` (one all-reduce);
- the q/k RMSNorms are per head (weight [head_dim]), so, unlike Wan's, they need no statistic from other ranks and
  stay replicated;
- everything else (patch, time, text / glyph / image embedders, the token refiner, modulation, final layer) stays
  replicated.

Per double-stream block: four all-reduces of [B, tokens, hidden] (two per stream). Single-stream blocks are refused:
their output projection reads [attention, MLP] activations concatenated, whose column split does not match a
contiguous row-wise shard (none of the published 1.5 transformers has single-stream blocks). Apply before the
sequence-parallel hooks (`parallelize_hy15_dit` reads the local head count), after the weights are loaded and moved.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .tensor_parallel import LocalColwiseParallel, _check_linear, _tp_mesh


def apply_tensor_parallel_hy15(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Make `model` (a HunyuanVideo15DiT with its weights loaded) tensor-parallel over `mesh["tp"]`, in place. A tp
    degree of 1 leaves it untouched; ValueError when tp does not divide the heads or the MLP width, or the model
    has single-stream blocks."""
    tp_mesh = _tp_mesh(mesh)
    tp = tp_mesh.size()
    if tp == 1:
        return model
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("this HunyuanVideo-1.5 DiT is already tensor-parallel; apply_tensor_parallel_hy15 runs once")
    c = model.config
    if c.heads_num % tp or c.mlp_hidden_dim % tp:
        raise ValueError(f"tp degree {tp} must divide the HunyuanVideo-1.5 DiT's {c.heads_num} attention heads and "
                         f"its MLP width {c.mlp_hidden_dim}")
    if len(model.single_blocks):
        raise ValueError("tensor parallelism of HunyuanVideo-1.5 single-stream blocks is not built (their output "
                         "projection reads [attention, MLP] concatenated); this DiT has "
                         f"{len(model.single_blocks)}")
    plan: dict[str, ParallelStyle] = {}
    for stream in ("img", "txt"):
        for name in ("q", "k", "v"):
            plan[f"{stream}_attn_{name}"] = ColwiseParallel()
        plan[f"{stream}_attn_proj"] = RowwiseParallel()
        plan[f"{stream}_mlp.fc1"] = LocalColwiseParallel()
        plan[f"{stream}_mlp.fc2"] = RowwiseParallel()
    for index in range(len(model.double_blocks)):  # every block checked before any changes
        for path in plan:
            _check_linear(model, f"double_blocks.{index}.{path}")
    for block in model.double_blocks:
        block.heads = c.heads_num // tp
        parallelize_module(block, tp_mesh, dict(plan))
    return model
