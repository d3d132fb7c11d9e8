"""`apply_tensor_parallel(model, mesh)`: Megatron-style tensor parallelism applied to an unchanged WanDiT.

Applied from outside the model with `torch.distributed.tensor.parallel.parallelize_module`, as
torchtitan does, over the mesh's "tp" dimension (other dimensions of the mesh are left alone):

- attention (self and cross; I2V's k_img / v_img too): q, k, v `ColwiseParallel` -> each tp rank holds
  num_heads / tp whole heads, and the module's `num_heads` is set to that local count so `_heads`
  unflattens the local slice; o `RowwiseParallel` -> one all-reduce per attention;
- q/k norms: Wan's RMSNorm spans all heads (weight [dim]), so with column-sharded q/k it needs the mean
  of squares over every tp rank. Each is replaced by `ShardedRMSNorm`, which holds its slice of the
  weight, sums the squares of its local features in float32, all-reduces that [B, S, 1] sum over the tp
  group and normalises as `telefuser.ops.normalization.RMSNorm` does (same eps, fp32 statistics,
  output in the input dtype);
- feed-forward: ffn.0 column-wise, ffn.2 `RowwiseParallel` (one all-reduce per FFN);
- everything else (patch, text, time and image embeddings, modulation, norm3, head) stays replicated.

Per block: three all-reduces of the [B, S, dim] activation (self-attention o, cross-attention o,
ffn.2) and four (five in I2V) small ones of [B, tokens, 1] for the norm statistics.

What each rank ends up holding (for `state_dict()` after parallelising; the keys never change):
- q, k, v, o, k_img, v_img, ffn.2 and the sharded norms' weights: DTensor parameters on the tp mesh
  (global shape in `.shape`, this rank's piece in `.to_local()`); the modules still return plain tensors
  (`use_local_output=True`), so the model code never sees a DTensor activation;
- ffn.0: a plain nn.Linear(dim, ffn_dim / tp) holding this rank's rows. `WanFeedForward` hands its
  up-projection to `telefuser.ops.activations.linear_gelu_tanh`, which on CUDA passes `up.weight` /
  `up.bias` straight to `torch._addmm_activation` (the GELU epilogue) with the plain activation; with
  ColwiseParallel's DTensor parameters that call fails ("aten._addmm_activation.default got mixed
  torch.Tensor and DTensor", seen on an H100 with torch 2.11 and NCCL). A column-wise Linear fed a
  replicated input needs no communication, so its local rows as a plain Linear are all of it, and the
  fused path keeps running.

DTensor on gloo / CPU (torch 2.13): `distribute_tensor` (scatter / broadcast from the group's first
rank), `DTensor.from_local`, the row-wise matmul's Partial -> Replicate all-reduce, dtype casts of
DTensor parameters, and the functional all-reduce the norms use all run on gloo with CPU tensors,
under `torch.inference_mode()` too (tests/test_tensor_parallel.py runs them on real gloo ranks), so
no plain-tensor fallback is needed.

Usage: build the model, load its weights, move it to the mesh's device (and dtype), then parallelise:

    model = WanDiT(config); model.load_state_dict(weights); model.to(device, dtype)
    apply_tensor_parallel(model, mesh)   # mesh has a "tp" dimension; other dimensions are ignored

The split weights are scattered (biases of o / ffn.2 broadcast) from the tp group's first rank
(`src_data_rank=0`), so the other ranks' values of those are overwritten; the replicated parts of the
model are not synchronised and must already be equal on every rank. A dtype cast after parallelising
(`model.to(torch.bfloat16)`) is fine; a device move after it is not supported (the DTensors stay
bound to the mesh's device type): move first.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from telefuser.models.wan.dit import WanCrossAttention, WanDiT, WanSelfAttention
from telefuser.ops.normalization import RMSNorm

TP_DIM = "tp"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a feature dimension split contiguously across the tp ranks.

    x is this rank's [..., dim / tp] slice; the statistic is the mean of squares over the full dim
    (local float32 sum of squares, all-reduced over the tp group, divided by the full dim), then
    x * rsqrt(mean + eps) * weight in float32, returned in x's dtype, as RMSNorm computes it.
    """

    def __init__(self, norm: RMSNorm, tp_mesh: DeviceMesh) -> None:
        super().__init__()
        self.eps = norm.eps
        self.tp_mesh = tp_mesh
        self.full_dim: int | None = None
        if norm.weight is not None:
            self.full_dim = norm.weight.shape[0]
            self.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), tp_mesh, [Shard(0)]),
                                       requires_grad=norm.weight.requires_grad)
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full_dim = self.full_dim if self.full_dim is not None else x.shape[-1] * self.tp_mesh.size()
        xf = x.float()
        square_sum = funcol.all_reduce(xf.pow(2).sum(-1, keepdim=True), "sum", self.tp_mesh)
        y = xf * torch.rsqrt(square_sum / full_dim + self.eps)
        if self.weight is not None:
            y = y * _local(self.weight).float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"full_dim={self.full_dim}, eps={self.eps}, tp={self.tp_mesh.size()}"


class LocalColwiseParallel(ColwiseParallel):
    """ColwiseParallel whose shard is kept as plain local parameters, with no hooks.

    A column-wise Linear fed a replicated input computes its output shard from its own rows alone, so
    nothing is communicated; the plain parameters let model code read `weight` / `bias` directly
    (see the module docstring: ffn.0 under `linear_gelu_tanh`). The shard is cut by `distribute_tensor`
    exactly as ColwiseParallel cuts it (scattered from the group's first rank).
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError("LocalColwiseParallel supports nn.Linear only")
        for name, param in list(module.named_parameters(recurse=False)):
            shard = distribute_tensor(param.detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(shard.to_local(), requires_grad=param.requires_grad))
        module.out_features = module.weight.shape[0]
        return module


def _tp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    names = mesh.mesh_dim_names or ()
    if TP_DIM not in names:
        raise ValueError(f"apply_tensor_parallel needs a device mesh with a {TP_DIM!r} dimension; "
                         f"this one has {names or 'no named dimensions'}")
    return mesh[TP_DIM]


def _check_linear(model: nn.Module, path: str) -> None:
    module = model.get_submodule(path)
    if type(module) is not nn.Linear:
        raise ValueError(f"tensor parallelism splits plain nn.Linear projections, but {path} is "
                         f"{type(module).__name__}; apply it before any layer replacement (quantisation, LoRA)")


def apply_tensor_parallel(model: WanDiT, mesh: DeviceMesh) -> WanDiT:
    """Make `model` (a WanDiT with its weights loaded) tensor-parallel over `mesh["tp"]`, in place.

    A tp degree of 1 leaves the model untouched. Raises ValueError when the tp degree does not divide
    the DiT's attention heads or its FFN width.
    """
    tp_mesh = _tp_mesh(mesh)
    tp = tp_mesh.size()
    if tp == 1:
        return model
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("this WanDiT is already tensor-parallel; apply_tensor_parallel runs once per model")
    config = model.config
    if config.num_heads % tp:
        raise ValueError(f"tp degree {tp} does not divide the DiT's {config.num_heads} attention heads; "
                         f"choose a tp_degree that divides {config.num_heads}")
    if config.ffn_dim % tp:
        raise ValueError(f"tp degree {tp} does not divide the DiT's ffn_dim {config.ffn_dim}; "
                         f"choose a tp_degree that divides {config.ffn_dim}")

    # Check every block before changing any, so a refusal leaves the model as it was.
    plans: list[tuple[nn.Module, dict[str, ParallelStyle], list[tuple[WanSelfAttention, str]]]] = []
    for index, block in enumerate(model.blocks):
        prefix = f"blocks.{index}"
        plan: dict[str, ParallelStyle] = {}
        norms: list[tuple[WanSelfAttention, str]] = []
        for attn_name in ("self_attn", "cross_attn"):
            attn: WanSelfAttention = getattr(block, attn_name)
            names = ["q", "k", "v"]
            norm_names = ["norm_q", "norm_k"]
            if isinstance(attn, WanCrossAttention) and attn.image:
                names += ["k_img", "v_img"]
                norm_names.append("norm_k_img")
            for name in names:
                plan[f"{attn_name}.{name}"] = ColwiseParallel()
            plan[f"{attn_name}.o"] = RowwiseParallel()
            for name in norm_names:
                norm = getattr(attn, name)
                if isinstance(norm, RMSNorm):
                    norms.append((attn, name))
                elif not isinstance(norm, nn.Identity):
                    raise ValueError(f"{prefix}.{attn_name}.{name} is {type(norm).__name__}; tensor parallelism "
                                     "knows how to split an RMSNorm (or no norm) over the heads")
        plan["ffn.0"] = LocalColwiseParallel()
        plan["ffn.2"] = RowwiseParallel()
        for path in plan:
            _check_linear(model, f"{prefix}.{path}")
        plans.append((block, plan, norms))

    for block, plan, norms in plans:
        for attn, name in norms:
            setattr(attn, name, ShardedRMSNorm(getattr(attn, name), tp_mesh))
        block.self_attn.num_heads = block.cross_attn.num_heads = config.num_heads // tp
        parallelize_module(block, tp_mesh, plan)
    return model
