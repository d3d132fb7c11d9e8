"""FSDP2 weight sharding (`telefuser.distributed.fsdp`) on real gloo ranks, against the same model unsharded.

Tolerance: FSDP only moves weights. Each unit's forward all-gathers byte-exact copies of the
parameters and then runs the unsharded model's own code on them, on the same inputs and the same
shapes, so the float32 outputs are bit-identical (as observed on this CPU). The one thing that differs
is where the gathered weights live in memory; a BLAS that picked a different vectorised path by
alignment could reorder a sum, moving results by ~1e-7 on these O(1) outputs, so outputs are compared
at atol 1e-6 / rtol 0, while a wrong or stale shard moves them by 1e-2 or more. The one case combined
with sequence parallelism uses that test's own tolerance (tests/test_parallel_wan.py).

Grad mode: the runtime runs every stage under torch.inference_mode(), so the forwards compared here
run under it too; a second model checks the order no_grad -> inference_mode, and the guard against
a no_grad forward after an inference_mode one is checked to raise its own clear error.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from gloo_ranks import spawn
from telefuser.distributed.fsdp import apply_fsdp, fsdp_mesh, local_parameter_bytes
from telefuser.distributed.parallelize_wan import parallelize_wan_dit
from telefuser.errors import PlanError
from telefuser.models.t5.umt5 import UMT5Config, UMT5Encoder
from telefuser.models.wan.dit import WanDiT, WanDiTConfig

ATOL = 1e-6
SP_ATOL, SP_RTOL = 1e-5, 1e-4  # sequence parallelism reorders attention sums (tests/test_parallel_wan.py)
DIT = WanDiTConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=48, num_heads=4, num_layers=2)
T5 = UMT5Config(vocab_size=100, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=8)
T5_SHARED_POS = UMT5Config(vocab_size=100, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=3,
                           num_buckets=8, shared_pos=True)  # a root parameter used before the blocks


def _dit_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, DIT.in_dim, 2, 6, 8, generator=g)  # 2 x 3 x 4 = 24 tokens
    return x, torch.tensor([700.0]), torch.randn(1, 12, DIT.text_dim, generator=g)


def _t5_inputs(cfg: UMT5Config) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, cfg.vocab_size, (2, 9), generator=g)
    mask = (torch.arange(9)[None, :] < torch.tensor([9, 5])[:, None]).long()
    return ids, mask


def _t5(cfg: UMT5Config) -> UMT5Encoder:
    model = UMT5Encoder(cfg)
    with torch.no_grad():  # weights of scale 0.3 (not the near-identity init) so every term matters
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    return model


def _pair(build) -> tuple[nn.Module, nn.Module]:
    """(reference, copy) with the same seeded float32 weights, both in eval mode."""
    torch.manual_seed(0)
    reference = build().eval()
    copy = build().eval()
    copy.load_state_dict(reference.state_dict())
    return reference, copy


def _all_sharded(model: nn.Module, world: int) -> bool:
    return all(isinstance(p, DTensor) and p.device_mesh.ndim == 1 and p.device_mesh.size() == world
               for p in model.parameters())


def _root_param_name(model: nn.Module) -> str:
    return next(n for n, _ in model.named_parameters() if not n.startswith("blocks."))


def _check(label: str, build, inputs: tuple[torch.Tensor, ...], mesh: DeviceMesh) -> None:
    world = dist.get_world_size()
    reference, sharded = _pair(build)
    full = local_parameter_bytes(reference)
    one_row_each = sum(p[0].numel() * p.element_size() if p.dim() else p.element_size() for p in reference.parameters())

    assert apply_fsdp(sharded, mesh) is sharded
    local = local_parameter_bytes(sharded)
    assert _all_sharded(sharded, world), label
    assert abs(local - full / world) <= one_row_each, (label, local, full, world)  # 1/world, up to one row each
    total = torch.tensor([local])
    dist.all_reduce(total)
    assert total.item() == full, (label, total.item(), full)  # the shards partition the weights exactly

    # Inside the forward, at the second block: the first block is resharded already (one block's full
    # weights at a time) and the root's parameters are whole, as the root's own code reads them
    # (WanDiT's linear_fp32 reads time_embedding weights directly; umT5 its token embedding).
    seen: dict[str, bool] = {}
    root_name = _root_param_name(reference)

    def at_second_block(_module: nn.Module, _args) -> None:
        seen["block0 resharded"] = all(isinstance(p, DTensor) for p in sharded.blocks[0].parameters())
        root_param = sharded.get_parameter(root_name)
        seen["root whole"] = (not isinstance(root_param, DTensor)
                              and root_param.shape == reference.get_parameter(root_name).shape)

    hook = sharded.blocks[1].register_forward_pre_hook(at_second_block)
    with torch.inference_mode():
        expected = reference(*inputs)
        for attempt in range(2):  # the second forward runs the reshard -> unshard cycle again
            seen.clear()
            got = sharded(*inputs)
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"{label} #{attempt}: {m}")
            assert seen == {"block0 resharded": True, "root whole": True}, (label, seen)
            assert _all_sharded(sharded, world) and local_parameter_bytes(sharded) == local, label
    hook.remove()

    with torch.no_grad(), pytest.raises(RuntimeError, match="under torch.inference_mode"):
        sharded(*inputs)  # the guard speaks before FSDP's cryptic in-place error, and leaves no state behind
    with torch.inference_mode():
        torch.testing.assert_close(sharded(*inputs), expected, atol=ATOL, rtol=0)

    _, other = _pair(build)  # the other order: no_grad first, inference_mode after
    apply_fsdp(other, mesh)
    with torch.no_grad():
        torch.testing.assert_close(other(*inputs), expected, atol=ATOL, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(other(*inputs), expected, atol=ATOL, rtol=0)


def _check_models(names: tuple[str, ...], shape: tuple[int, ...], t5: UMT5Config) -> None:
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    flat = fsdp_mesh(mesh)
    assert flat.ndim == 1 and sorted(flat.mesh.tolist()) == list(range(dist.get_world_size())), flat
    label = f"{names} {shape}"
    _check(f"WanDiT {label}", lambda: WanDiT(DIT), _dit_inputs(), mesh)
    _check(f"UMT5Encoder {label}", lambda: _t5(t5), _t5_inputs(t5), mesh)


class _Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


def _check_refusals() -> None:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cfg",))
    with pytest.raises(PlanError, match=r"Linear has nothing at `\.blocks`"):
        apply_fsdp(nn.Linear(4, 4), mesh)
    with pytest.raises(PlanError, match=r"its block lists: \.layers; pass block_attr"):
        apply_fsdp(_Layers(), mesh)
    model = _Layers()
    apply_fsdp(model, mesh, block_attr="layers")  # any block list, named by the caller
    assert _all_sharded(model, 2)
    with pytest.raises(ValueError, match="already sharded"):
        apply_fsdp(model, mesh, block_attr="layers")
    # A 1-rank mesh has nothing to share: the model stays as it is.
    alone = init_device_mesh("cpu", (2, 1), mesh_dim_names=("cfg", "sp_ulysses"))["sp_ulysses"]
    unchanged = WanDiT(DIT)
    assert apply_fsdp(unchanged, alone) is unchanged
    assert not any(isinstance(p, DTensor) for p in unchanged.parameters())


def _check_with_sequence_parallel() -> None:
    """FSDP over the whole (cfg, sp_ulysses) mesh on top of Ulysses attention over its sp ranks."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cfg", "sp_ulysses"))
    reference, sharded = _pair(lambda: WanDiT(DIT))
    apply_fsdp(parallelize_wan_dit(sharded, mesh), mesh)
    with torch.inference_mode():
        expected = reference(*_dit_inputs())
        for _ in range(2):
            torch.testing.assert_close(sharded(*_dit_inputs()), expected, atol=SP_ATOL, rtol=SP_RTOL)


def _worker_2() -> None:
    _check_models(("cfg",), (2,), T5)
    _check_models(("cfg", "sp_ulysses"), (1, 2), T5_SHARED_POS)
    _check_refusals()


def _worker_4() -> None:
    _check_models(("cfg", "sp_ulysses"), (2, 2), T5)  # flattened to one dimension of 4
    _check_models(("sp_ulysses",), (4,), T5_SHARED_POS)
    _check_with_sequence_parallel()


def test_fsdp_2_ranks(monkeypatch):
    spawn(_worker_2, 2, monkeypatch)


def test_fsdp_4_ranks(monkeypatch):
    spawn(_worker_4, 4, monkeypatch)
