"""`apply_fsdp(model, mesh)`: FSDP2 weight sharding of an unchanged model for inference (`enable_fsdp`).

Each transformer block (the nn.ModuleList at `block_attr`: `.blocks` on WanDiT and on UMT5Encoder)
becomes one `fully_shard` unit, then the root takes the remaining parameters (embeddings, head,
norms). Every rank keeps 1/world of each parameter (dim-0 chunks; FSDP pads the last chunk in its
own storage). A forward all-gathers one unit's weights just before that unit runs and frees them
again after it (`reshard_after_forward=True`, also on the root), so the full weights of one block
plus the root's are live at a time. No grads, no optimizer: FSDP only moves weights, the
arithmetic is the unsharded model's, on the same full weights.

Mesh. All ranks of the mesh share the weights, whatever its dimensions (cfg, sp_ulysses, ...):
`fsdp_mesh(mesh)` flattens a mesh of several dimensions to one 1-D dimension named "fsdp" with
`DeviceMesh._flatten` (what torchtitan uses). A mesh over the whole world is then backed by the
default process group itself (no new communicator); the flattened mesh is cached on the root mesh,
so the DiT and the text encoder share it. `init_device_mesh(type, (world,))` would also work, but
only when the mesh covers the whole world; it is the fallback for a mesh with unnamed dimensions.
A 1-rank mesh has nothing to share: `apply_fsdp` returns the model unchanged.

What the caller (the runtime) must do:
- Build the model where it loads (CPU is fine) and call `apply_fsdp` with the device mesh; do not
  move the whole model to the GPU first: `fully_shard` moves each unit to the mesh's device (the
  current CUDA device: set it first) and keeps only its shard, so the device never holds more
  than the shards plus one unit's full weights while sharding.
- Call every sharded model's forward on EVERY rank of the mesh, the same number of times in the
  same order: each unit's unshard is an all-gather over all ranks. Today the text stage runs the
  encoder on each dp replica's lead only; with FSDP every rank must run the encoder (and may drop
  the result), and nothing may skip blocks on some ranks only (step caches).
- Grad mode. Weights in the compute dtype need no MixedPrecisionPolicy: FSDP gathers in the
  parameters' own dtype. The runtime runs each stage under `torch.inference_mode()`, and on torch
  2.13 that works for a sharded model on 2 or more ranks (tests/test_fsdp.py runs it), with one
  rule: FSDP allocates its all-gather buffers at a model's first forward and reuses them, so if
  that first forward ran under inference_mode the buffers are inference tensors, and any later
  forward outside inference mode (plain `no_grad`, or grads on) fails inside FSDP ("Inplace update
  to inference tensor outside InferenceMode"). So keep every forward of a sharded model inside
  inference_mode (the stage wrapper does; a warm-up or compile pass must too). `apply_fsdp`
  turns a breach into a clear error. The opposite order is fine: buffers made under `no_grad`
  accept later inference_mode forwards.
  Where inference_mode does not work (torch 2.13 raises "Inference tensors do not track version
  counter" on a 1-rank FSDP mesh, which apply_fsdp therefore never builds; older torch releases,
  not checked here, raised it on every mesh before FSDP learnt to skip version counters of
  inference tensors), run the sharded model's forward as
      with torch.inference_mode(False), torch.no_grad():
          out = model(...)
  even inside a stage's inference_mode: inputs made under inference mode may be read there, and
  the output is an ordinary tensor the rest of the stage can use. That works on any mesh and in
  any order.
- `local_parameter_bytes(model)` (this rank's parameter bytes, DTensor shards counted by their
  local part) before and after `apply_fsdp` shows the 1/world drop, for the run report and bench.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from telefuser.errors import PlanError

try:  # public since torch 2.6
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover - torch 2.4 / 2.5
    from torch.distributed._composable.fsdp import FSDPModule, fully_shard

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor

FSDP_DIM = "fsdp"

__all__ = ["FSDP_DIM", "apply_fsdp", "fsdp_mesh", "local_parameter_bytes"]


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """`mesh` as one dimension over all its ranks (itself when it has one dimension)."""
    if mesh.ndim == 1:
        return mesh
    if mesh.mesh_dim_names and hasattr(mesh, "_flatten"):
        return mesh._flatten(FSDP_DIM)
    if dist.is_initialized() and mesh.size() == dist.get_world_size():
        return init_device_mesh(mesh.device_type, (mesh.size(),), mesh_dim_names=(FSDP_DIM,))
    raise ValueError(f"cannot flatten {mesh} for FSDP: it has unnamed dimensions and does not cover the "
                     f"whole world of {dist.get_world_size() if dist.is_initialized() else 1} ranks; "
                     "name its dimensions (init_device_mesh(..., mesh_dim_names=...))")


def _block_list(model: nn.Module, block_attr: str) -> nn.ModuleList:
    blocks = getattr(model, block_attr, None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
        return blocks
    if blocks is None:
        found = "nothing"
    elif isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        found = f"an empty {type(blocks).__name__}"
    else:
        found = f"a {type(blocks).__name__}"
    lists = [name for name, child in model.named_children() if isinstance(child, nn.ModuleList) and len(child)]
    raise PlanError(
        f"enable_fsdp shards a model one transformer block at a time, but {type(model).__name__} has "
        f"{found} at `.{block_attr}` where its nn.ModuleList of blocks should be"
        + (f" (its block lists: {', '.join('.' + n for n in lists)}; pass block_attr naming one)" if lists else "")
        + ". Shard only models with a block list (WanDiT and UMT5Encoder: `.blocks`; HunyuanVideo15DiT: "
        "`.double_blocks`; Qwen25VLTextEncoder: `.layers`), or turn "
        "parallel_config.enable_fsdp off for this model and recompile the recipe."
    )


def _guard_grad_mode(model: nn.Module) -> None:
    """Refuse, with a clear message, a forward outside inference mode after one inside it (see the module doc).

    Registered after fully_shard with prepend=True, so it runs before FSDP's own pre-forward unshard."""
    first: dict[str, bool] = {}

    def check(_module: nn.Module, _args: Any) -> None:
        inference = torch.is_inference_mode_enabled()
        first.setdefault("inference", inference)
        if first["inference"] and not inference:
            raise RuntimeError(
                f"this FSDP-sharded {type(model).__name__} ran its first forward under torch.inference_mode(), so "
                "its all-gather buffers are inference tensors and every later forward must run under "
                "torch.inference_mode() too (this one runs outside it). Keep all its forwards inside "
                "inference_mode, or make the first one run under torch.inference_mode(False) + torch.no_grad()."
            )

    model.register_forward_pre_hook(check, prepend=True)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, block_attr: str = "blocks") -> nn.Module:
    """Shard `model`'s weights over all ranks of `mesh` (FSDP2, for inference), in place; returns it.

    Each block of `model.<block_attr>` is one unit, the root the other; both reshard after forward.
    A 1-rank mesh leaves the model unchanged. See the module doc for what the caller must do."""
    blocks = _block_list(model, block_attr)
    if isinstance(model, FSDPModule) or any(isinstance(b, FSDPModule) for b in blocks):
        raise ValueError(f"{type(model).__name__} is already sharded with FSDP; apply_fsdp runs once per model")
    flat = fsdp_mesh(mesh)
    if flat.size() == 1:
        return model
    for block in blocks:
        fully_shard(block, mesh=flat, reshard_after_forward=True)
    fully_shard(model, mesh=flat, reshard_after_forward=True)
    _guard_grad_mode(model)
    return model


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters held by this rank: a DTensor counts its local shard (FSDP's
    padding of the last chunk excluded: at most one dim-0 row per parameter)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total
