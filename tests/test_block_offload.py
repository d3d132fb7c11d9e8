"""SEQUENTIAL_CPU_OFFLOAD / ASYNC_CPU_OFFLOAD: a DiT's blocks streamed from host memory as the plan records it.

On the CPU the "device" copy is a second CPU buffer, so the ring of group buffers, the slot reuse and the hooks run
for real; every mode must give the same bits as resident weights (same device, same dtype: the same kernels read the
same values, only from other addresses). The gpu-marked test covers pinned memory, the side stream and the peak.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import telefuser
from compiler_fixtures import TINY, model_set, write_recipe
from telefuser.compiler import compile_recipe
from telefuser.compiler.block_offload import ALIGN, block_bytes, streamed_blocks, wan_block_tensors
from telefuser.compiler.explain import explain
from telefuser.errors import PlanError, RecipeError
from telefuser.models import tiny
from telefuser.models.wan.dit import WanBlock, WanDiTConfig

LAYERS = 5  # enough groups for the ring to wrap and evict


def offload(model: str, **config) -> str:
    items = ", ".join(f"{k} = {json.dumps(v)}" for k, v in config.items())
    return f"[layer2.models.{model}]\noffload_config = {{ {items} }}\n"


@pytest.fixture(scope="module")
def deep_set(tmp_path_factory):
    """The tiny model set with a 5-block DiT (tiny's weights generator, Wan's key names)."""
    folder = model_set(tmp_path_factory.mktemp("deep"))
    state = tiny.tiny_state_dict("dit", {**tiny.TINY_ARCH["dit"], "num_layers": LAYERS})
    save_file(state, folder / "dit.safetensors")
    return folder


def load(folder, extra: str, name: str):
    plan = compile_recipe(write_recipe(folder, layer2_extra=extra, name=f"{name}.toml"))
    path = folder / f"{name}.plan.json"
    path.write_text(json.dumps(plan.model_dump(mode="json", by_alias=True)))
    return plan, telefuser.load_plan(path)


def host_spans(streamer) -> list[tuple[int, int]]:
    return [(c.data_ptr(), c.data_ptr() + c.numel()) for g in streamer.groups for c in g.chunks]


def inside(tensor: torch.Tensor, spans) -> bool:
    return any(lo <= tensor.data_ptr() < hi for lo, hi in spans)


# --- what the compiler knows of a block, checked against the model class ---------------------------------------

@pytest.mark.parametrize("changes", [{}, {"model_type": "i2v", "in_dim": 36, "image_dim": 32},
                                     {"qk_norm": False, "cross_attn_norm": False}])
def test_block_tensors_from_the_arch_are_the_model_classes(changes):
    config = WanDiTConfig(**{**tiny.TINY_ARCH["dit"], **changes})
    with torch.device("meta"):
        block = WanBlock(config)
    real = {name: tuple(t.shape) for name, t in block.state_dict().items()}
    assert dict(wan_block_tensors({**tiny.TINY_ARCH["dit"], **changes})) == real


def test_streamed_blocks_are_spread_over_the_depth():
    assert streamed_blocks(40, 1.0) == list(range(40))
    assert streamed_blocks(10, 0.5) == [1, 3, 5, 7, 9]
    assert streamed_blocks(5, 0.6) == [1, 3, 4]  # round(3.0) = 3 of 5
    assert streamed_blocks(4, 0.01) == [3]  # at least one block


# --- the plan and the estimate's arithmetic on the built models ---------------------------------------------------

def test_estimate_components_equal_the_built_models_bytes(deep_set):
    extra = offload("dit", offload_type="ASYNC_CPU_OFFLOAD", blocks_per_group=2, prefetch_size=1, offload_ratio=0.8)
    plan, pipe = load(deep_set, extra, "estimate")
    b = plan.memory.block_plan("dit")
    assert b.groups == [[1, 2], [3, 4]] and b.groups_resident == 2 and b.prefetch_groups == 1  # block 0 kept
    placement = pipe.placements["dit"]
    streamer = placement.streamer
    module = placement.module
    param_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert plan.memory.breakdown["weights.dit"] == param_bytes  # the parameter count x float32
    # a group's bytes: the real ring buffer (every tensor at a 512-byte boundary)
    assert b.group_bytes == streamer.slot_bytes == max(g.nbytes for g in streamer.groups)
    packed, raw = block_bytes(plan.model("dit"), plan.layer2_inference_config.models["dit"])
    one_block = sum(t.numel() * t.element_size() for t in module.blocks[0].state_dict().values())
    assert raw == one_block and packed == sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN
                                              for t in module.blocks[0].state_dict().values())
    rest = sum(t.numel() * t.element_size() for t in streamer.rest.state_dict().values())
    assert b.resident_bytes == rest == param_bytes - 4 * one_block  # non-block weights + kept block 0
    assert plan.memory.breakdown["blocks.dit.ring"] == 2 * b.group_bytes
    denoise = next(s for s in plan.memory.stages if s.stage == "denoise")
    assert denoise.components["in_use.dit"] == 2 * b.group_bytes
    assert denoise.components["resident"] == b.resident_bytes + sum(
        plan.memory.breakdown[f"weights.{m}"] for m in ("vae", "text_encoder", "tokenizer"))
    for stage in plan.memory.stages:
        assert stage.peak_bytes == sum(stage.components.values())
    assert plan.memory.peak_bytes == max(s.peak_bytes for s in plan.memory.stages)
    # the rest stays on the "device"; the streamed blocks are views of their host chunks between uses
    spans = host_spans(streamer)
    assert all(inside(t, spans) for i in (1, 2, 3, 4) for t in module.blocks[i].state_dict().values())
    assert not any(inside(t, spans) for t in streamer.rest.state_dict().values())


def test_explain_shows_the_stage_peaks_and_the_streaming(deep_set):
    extra = offload("dit", offload_type="SEQUENTIAL_CPU_OFFLOAD", blocks_per_group=2)
    text = explain(compile_recipe(write_recipe(deep_set, layer2_extra=extra, name="explain.toml")))
    assert "memory per stage (estimated peak per device, GiB):" in text
    assert "  denoise           peak " in text and "  decode_vae        peak " in text
    assert ("  dit            SEQUENTIAL_CPU_OFFLOAD: 5 of 5 blocks streamed in 3 group(s) of 2, ring of 1 x "
            in text) and "each group copied in before it runs" in text and "resident for the run" in text


# --- bit-identical outputs ------------------------------------------------------------------------------------------

MODES = {
    "model": offload("dit", offload_type="MODEL_CPU_OFFLOAD"),
    "sequential_1": offload("dit", offload_type="SEQUENTIAL_CPU_OFFLOAD", blocks_per_group=1),
    # blocks 1, 3, 4 streamed as [1, 3], [4] through one buffer: every group evicts the one before
    "sequential_2_ratio": offload("dit", offload_type="SEQUENTIAL_CPU_OFFLOAD", blocks_per_group=2, offload_ratio=0.6),
    "async_1": offload("dit", offload_type="ASYNC_CPU_OFFLOAD", blocks_per_group=1, prefetch_size=1),
    "async_2_ahead_2": offload("dit", offload_type="ASYNC_CPU_OFFLOAD", blocks_per_group=2, prefetch_size=2),
    "async_default": offload("dit", offload_type="ASYNC_CPU_OFFLOAD"),  # one group: all 5 blocks
}


@pytest.fixture(scope="module")
def resident(deep_set):
    _, pipe = load(deep_set, "", "resident")
    return pipe, pipe.run(prompt="a red fox", seed=5, progress=False).frames


@pytest.mark.parametrize("mode", list(MODES))
def test_every_offload_mode_makes_the_resident_video_and_dit_output(deep_set, resident, mode):
    pipe_resident, expected = resident
    plan, pipe = load(deep_set, MODES[mode], mode)
    assert np.array_equal(pipe.run(prompt="a red fox", seed=5, progress=False).frames, expected)
    # the DiT's output itself (the velocity the solver integrates), on fresh random inputs
    g = torch.Generator().manual_seed(11)
    x, context = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 16, 32, generator=g)
    t = torch.tensor([917.0])
    with torch.inference_mode():
        with pipe_resident.placements["dit"].active() as dit:
            want = dit(x, t, context)
        with pipe.placements["dit"].active() as dit:
            got = dit(x, t, context)
    assert torch.equal(got, want)
    streamer = pipe.placements["dit"].streamer
    if streamer is None:
        return
    b = plan.memory.block_plan("dit")
    forwards = 2 * 2 + 1  # 2 steps x (cond + uncond), then the direct call
    if b.groups_resident < len(b.groups):  # the ring wraps: every group copied in once per forward, and with
        # prefetch the first group once more at the end of each use (denoise stage, direct call), for a next forward
        assert streamer.copies_in == forwards * len(b.groups) + (2 if b.prefetch_groups else 0)
    else:  # every group fits the ring: copied once per activation (the denoise stage, the direct call)
        assert streamer.copies_in == 2 * len(b.groups)
    assert not streamer.active and all(inside(t, host_spans(streamer)) for g in b.groups for i in g
                                       for t in pipe.placements["dit"].module.blocks[i].state_dict().values())


class Writes(TorchDispatchMode):
    """The address every aten copy_ writes to, taken when it runs (tensors are re-pointed afterwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("copy_", "_copy_from"):
            self.targets.append(args[0].data_ptr() if func.overloadpacket.__name__ == "copy_" else args[1].data_ptr())
        return func(*args, **(kwargs or {}))


def test_the_ring_reuses_its_buffers_and_copies_nothing_into_host_memory(deep_set):
    plan, pipe = load(deep_set, MODES["async_1"], "ring")
    placement = pipe.placements["dit"]
    streamer, blocks = placement.streamer, placement.module.blocks
    seen: list[set[int]] = []

    def record(_module, _args):  # which ring buffers hold the running block's tensors
        seen.append({next(i for i, r in enumerate(streamer.ring) if inside(t, [(r.data_ptr(), r.data_ptr() + r.numel())]))
                     for t in _module.state_dict().values()})

    for block in blocks:
        block.register_forward_pre_hook(record)  # after the streamer's hook: the group is resident now
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 16, 32, generator=g)
    host = host_spans(streamer)
    with Writes() as writes, torch.inference_mode(), placement.active() as dit:
        rings = [r.data_ptr() for r in streamer.ring]
        for _ in range(2):
            dit(x, torch.tensor([500.0]), context)
        assert [r.data_ptr() for r in streamer.ring] == rings  # two buffers for the whole use, none allocated per group
    assert len(rings) == 2
    # slots alternate: group g in slot g % 2 in the first forward; the wrap-around prefetch shifts the second
    assert [s.pop() for s in seen] == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    ring = [(r, r + streamer.slot_bytes) for r in rings]
    assert not [p for p in writes.targets if any(lo <= p < hi for lo, hi in host)], "a copy wrote into host memory"
    assert sum(any(lo <= p < hi for lo, hi in ring) for p in writes.targets) >= 2 * 5  # the groups' copies in


def test_moe_experts_stream_and_the_inactive_one_is_all_in_host_memory(tmp_path):
    shutil.copytree(TINY.parent, tmp_path / "recipes", ignore=shutil.ignore_patterns("*.mp4"))
    recipes = tmp_path / "recipes"
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frames = {}
    extras = {"resident": "",
              "blocks": offload("dit_high", offload_type="ASYNC_CPU_OFFLOAD", blocks_per_group=1)
              + offload("dit_low", offload_type="SEQUENTIAL_CPU_OFFLOAD", blocks_per_group=1),
              "mixed": offload("dit_high", offload_type="MODEL_CPU_OFFLOAD")
              + offload("dit_low", offload_type="ASYNC_CPU_OFFLOAD", blocks_per_group=1, offload_ratio=0.5)}
    for name, extra in extras.items():
        recipe = recipes / f"moe_{name}.toml"  # beside tiny/, which the recipe's paths name
        text = (recipes / "tiny_wan22_i2v.toml").read_text()  # 2 steps (one per expert), 5 frames: quicker
        text = text.replace("num_inference_steps = 4", "num_inference_steps = 2").replace("num_frames = 9", "num_frames = 5")
        recipe.write_text(text + "\n" + extra)
        plan = compile_recipe(recipe)
        path = tmp_path / f"{name}.plan.json"
        path.write_text(json.dumps(plan.model_dump(mode="json", by_alias=True)))
        pipe = telefuser.load_plan(path)
        if name == "blocks":
            assert [b.resident_between_uses for b in plan.memory.block_offload] == [False, False]
            high, low = pipe.placements["dit_high"], pipe.placements["dit_low"]
            checks = []

            def low_on_host(_module, _args):  # while the high-noise expert runs
                chunks = [(c.data_ptr(), c.data_ptr() + c.numel()) for c in low.weights.chunks] + host_spans(low.streamer)
                checks.append(all(inside(t, chunks) for t in low.module.state_dict().values()))

            high.module.blocks[0].register_forward_pre_hook(low_on_host)
        frames[name] = pipe.run(prompt="a cat", seed=2, image=image, progress=False).frames
        if name == "blocks":
            assert len(checks) == 2 and all(checks)  # the high-noise expert's step: cond + uncond
    assert np.array_equal(frames["blocks"], frames["resident"])
    assert np.array_equal(frames["mixed"], frames["resident"])


def test_text_encoder_on_the_cpu_gives_the_same_video_and_cpu_dispatch(deep_set, resident):
    plan, pipe = load(deep_set, "[layer2.models.text_encoder]\nrun_on_cpu = true\n", "te_cpu")
    assert pipe.placements["text_encoder"].device == torch.device("cpu")
    assert np.array_equal(pipe.run(prompt="a red fox", seed=5, progress=False).frames, resident[1])
    assert "host_weights.text_encoder" in plan.memory.breakdown and "weights.text_encoder" not in plan.memory.breakdown
    encode = next(s for s in plan.memory.stages if s.stage == "encode_text")
    assert encode.components["activations"] == 0
    # on a CUDA target its kernels are chosen as for a CPU
    cuda = compile_recipe(write_recipe(deep_set, layer2_extra="[layer2.models.text_encoder]\nrun_on_cpu = true\n",
                                       name="te_cuda.toml"), overrides=["target.device=cuda", "target.gpu=H100"])
    cpu_dispatch = {(d.op, d.impl) for d in plan.dispatch if d.model == "text_encoder"}
    assert {(d.op, d.impl) for d in cuda.dispatch if d.model == "text_encoder"} == cpu_dispatch


# --- refusals -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, overrides, needle", [
    (offload("vae", offload_type="ASYNC_CPU_OFFLOAD"), [],
     "layer2.models.vae.offload_config.offload_type = 'ASYNC_CPU_OFFLOAD': block offload streams the repeated blocks of "
     "a DiT or a text encoder"),
    (offload("dit", offload_type="ASYNC_CPU_OFFLOAD", prefetch_size=0), [],
     "ASYNC_CPU_OFFLOAD with prefetch_size = 0 copies nothing ahead"),
    (offload("dit", offload_type="SEQUENTIAL_CPU_OFFLOAD"),
     ["target.num_devices=2", "layer2.parallel_config.tp_degree=2"], "tp_degree > 1 (tensor-parallel weights"),
    ("[layer2.models.dit]\nrun_on_cpu = true\n", [], "only the text encoder and the CLIP image encoder run on the CPU"),
    (offload("dit", offload_type="ASYNC_CPU_OFFLOAD") + "compile_config = { enabled = true, fullgraph = true }\n", [],
     "ASYNC_CPU_OFFLOAD with compile_config.fullgraph = true: the streaming hook runs eagerly"),
    (offload("dit", offload_type="SEQUENTIAL_CPU_OFFLOAD") + "compile_config = { enabled = true, mode = "
     "\"reduce-overhead\" }\n", [], "CUDA graphs replay fixed weight addresses"),
])
def test_settings_that_do_not_compose_are_refused(tmp_path, extra, overrides, needle):
    recipe = write_recipe(model_set(tmp_path / "m"), layer2_extra=extra)
    with pytest.raises(RecipeError) as info:
        compile_recipe(recipe, overrides=overrides)
    assert needle in str(info.value)


def test_sequence_and_cfg_parallel_compile_with_block_offload(tmp_path):
    recipe = write_recipe(model_set(tmp_path / "m"), layer2_extra=offload("dit", offload_type="ASYNC_CPU_OFFLOAD"))
    plan = compile_recipe(recipe, overrides=["target.num_devices=4", "layer2.parallel_config.sp_ulysses_degree=2",
                                             "layer2.parallel_config.cfg_degree=2"])
    assert plan.memory.block_plan("dit").mode == "ASYNC_CPU_OFFLOAD"


def test_over_capacity_names_the_settings_that_fit(tmp_path, capsys):
    from telefuser.cli.compile import main

    # 480p is allowed: the untiled VAE decode sets the peak (est. 1.38 GiB); tiled, it is est. 1.09 GiB
    recipe = write_recipe(model_set(tmp_path / "m"))
    text = recipe.read_text().replace('choices = ["144p"]', 'choices = ["144p", "480p"]')
    recipe.write_text(text)
    out = tmp_path / "plan.json"
    assert main([str(recipe), "-o", str(out), "--set", "target.memory_gib=1.2"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and not out.exists()
    assert "exceeds the target's 1.2 GiB" in err and "(largest in stage decode_vae:" in err
    assert "These settings would fit (estimated peak): --set layer2.tiled=true (1.1 GiB)" in err
    assert "ASYNC_CPU_OFFLOAD" not in err  # streaming the tiny DiT saves nothing that matters here


def test_fitting_settings_for_the_14b_dit_on_24_gib():
    """Wan2.1 T2V 14B (bf16, 480p x 81 frames, CFG) on a 24 GiB GPU: only streaming the DiT's blocks brings it
    under; the text encoder's offload alone does not (the DiT's 26.6 GiB stay)."""
    from telefuser.compiler.memory_fit import fitting_settings
    from telefuser.compiler.models import plan_model
    from telefuser.compiler.recipe_loader import load_recipe
    from telefuser.compiler.target import resolve_target
    from telefuser.models import registry

    loaded = load_recipe(TINY.parent / "wan21_t2v_14b.toml", ["target.gpu=RTX4090"])
    models = []
    for spec in loaded.recipe.layer1.models:  # the shipped recipe's models, counted from the classes on meta
        planned = plan_model(spec, loaded.recipe, loaded.path.parent, inspect=False)
        if planned.role == "tokenizer":
            models.append(planned)
            continue
        entry = registry.get({"dit": "WanDiT", "vae": "WanVAE", "text_encoder": "UMT5Encoder"}[planned.role])
        config = {"dit": lambda: WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
                  "vae": entry.config_class, "text_encoder": entry.config_class}[planned.role]()
        with torch.device("meta"):
            count = sum(p.numel() for p in entry.model_class(config).parameters())
        models.append(planned.model_copy(update={"parameter_count": count, "arch": dict(vars(config)),
                                                 "compute_dtype": "bfloat16"}))
    fits = dict(fitting_settings(loaded.recipe, models, resolve_target(loaded.recipe.target)))
    assert "--set layer2.models.dit.offload_config.offload_type=ASYNC_CPU_OFFLOAD" in fits
    assert "--set layer2.models.text_encoder.offload_config.offload_type=MODEL_CPU_OFFLOAD" not in fits
    assert all(peak <= 24 * 2**30 for peak in fits.values())


def test_a_cuda_plan_with_block_offload_is_refused_on_a_cpu_machine(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from telefuser.cli.run import main

    recipe = write_recipe(model_set(tmp_path / "m"), layer2_extra=offload("dit", offload_type="ASYNC_CPU_OFFLOAD"))
    plan = compile_recipe(recipe, overrides=["target.device=cuda", "target.gpu=H100"])
    path = tmp_path / "cuda.plan.json"
    path.write_text(json.dumps(plan.model_dump(mode="json", by_alias=True)))
    out = tmp_path / "v.mp4"
    assert main([str(path), "--prompt", "x", "-o", str(out), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and "the plan targets CUDA but this machine has no usable CUDA GPU" in err
    assert not out.exists() and not list(tmp_path.glob("*.mp4*"))


def test_a_block_offload_plan_without_its_streaming_is_refused(deep_set, tmp_path):
    from telefuser.schema.canonical import plan_hash, pretty_json

    plan = compile_recipe(write_recipe(deep_set, layer2_extra=MODES["async_1"], name="nostream.toml"))
    raw = plan.model_dump(mode="json", by_alias=True)
    raw["memory"]["block_offload"] = []  # a hand-edited plan: its placement streams blocks it no longer records
    raw["plan_hash"] = plan_hash(raw)
    path = tmp_path / "nostream.json"
    path.write_text(pretty_json(raw))
    with pytest.raises(PlanError, match="but its streaming in memory.block_offload has 0"):
        telefuser.load_plan(str(path))


# --- CUDA -------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_async_streaming_is_bit_identical_uses_the_side_stream_and_lowers_the_peak(tmp_path):
    from telefuser.compiler.block_offload import plan_block_offload
    from telefuser.models import registry
    from telefuser.runtime.memory.placement import Placement
    from telefuser.schema.model_config import ModelRuntimeConfig

    device = torch.device("cuda")
    arch = {**tiny.TINY_ARCH["dit"], "dim": 512, "ffn_dim": 2048, "num_heads": 4, "num_layers": 8}
    entry = registry.get("WanDiT")
    state = tiny.tiny_state_dict("dit", arch)

    def build() -> torch.nn.Module:
        model = entry.model_class(entry.config_class(**arch))
        model.load_state_dict(state)
        return model.to(torch.bfloat16).eval()

    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 16, 5, 32, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    inputs = [a.to(device) for a in (x, torch.tensor([700.0]), context)]

    def peak_of(run) -> tuple[torch.Tensor, int]:
        """The output and the peak allocated above what was there before (models built inside count)."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    def resident():
        with torch.inference_mode():
            return build().to(device)(*inputs)

    planned = compile_recipe(write_recipe(model_set(tmp_path / "m"))).model("dit")
    planned = planned.model_copy(update={"arch": arch, "compute_dtype": "bfloat16"})
    runtime = ModelRuntimeConfig.model_validate({"offload_config": {"offload_type": "ASYNC_CPU_OFFLOAD",
                                                                    "blocks_per_group": 1, "prefetch_size": 1}})
    spec = plan_block_offload(planned, runtime, 0, several_dits=False)
    used: dict = {}

    def streamed():
        placement = Placement(build(), device, offload=False, name="dit", blocks=spec)
        used["streamer"] = placement.streamer
        with torch.inference_mode(), placement.active() as dit:
            return dit(*inputs)

    want, resident_peak = peak_of(resident)
    got, streamed_peak = peak_of(streamed)
    streamer = used["streamer"]
    assert all(c.is_pinned() for group in streamer.groups for c in group.chunks)
    assert torch.equal(got, want)
    side = streamer._side
    assert streamer.copy_streams == {side.cuda_stream} and side.cuda_stream != torch.cuda.current_stream().cuda_stream
    # 8 groups through a ring of 2: each copied once, and the first once more ahead of a next forward
    assert streamer.copies_in == len(spec.groups) + 1 and spec.groups_resident == 2
    assert streamed_peak < resident_peak


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_async_streaming_under_inductor_gives_the_resident_compiled_output(tmp_path):
    """compile_config with inductor (each block compiled, as runtime/loading.py does) beside ASYNC streaming: the
    hook is a graph break before each streamed block and the weights move between ring slots from one forward to
    the next, so three forwards (groups landing in other slots each time) must each give the resident compiled
    model's output. Same graphs on both sides: bit-identical unless inductor compiled them differently, so the
    tolerance is bf16's rounding of the output (2^-8 relative to its largest value)."""
    from telefuser.compiler.block_offload import plan_block_offload
    from telefuser.models import registry
    from telefuser.runtime.memory.placement import Placement
    from telefuser.schema.model_config import ModelRuntimeConfig

    device = torch.device("cuda")
    arch = {**tiny.TINY_ARCH["dit"], "dim": 256, "ffn_dim": 1024, "num_heads": 2, "num_layers": 5}
    entry = registry.get("WanDiT")
    state = tiny.tiny_state_dict("dit", arch)

    def build() -> torch.nn.Module:
        model = entry.model_class(entry.config_class(**arch))
        model.load_state_dict(state)
        model = model.to(torch.bfloat16).eval()
        for block in model.blocks:
            block.compile(backend="inductor")
        return model

    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(1, 16, 3, 16, 16, generator=g), torch.randn(1, 16, 32, generator=g)
    inputs = [a.to(device) for a in (x, torch.tensor([600.0]), context)]
    with torch.inference_mode():
        want = build().to(device)(*inputs)
    planned = compile_recipe(write_recipe(model_set(tmp_path / "m"))).model("dit")
    planned = planned.model_copy(update={"arch": arch, "compute_dtype": "bfloat16"})
    runtime = ModelRuntimeConfig.model_validate({"offload_config": {"offload_type": "ASYNC_CPU_OFFLOAD",
                                                                    "blocks_per_group": 2, "prefetch_size": 1}})
    spec = plan_block_offload(planned, runtime, 0, several_dits=False)
    placement = Placement(build(), device, offload=False, name="dit", blocks=spec)
    scale = want.abs().max().item()
    with torch.inference_mode(), placement.active() as dit:
        for _ in range(3):  # 3 groups through a ring of 2: every forward finds them in other slots
            got = dit(*inputs)
            assert (got - want).abs().max().item() <= scale * 2**-8
    assert placement.streamer.copies_in > len(spec.groups)


def test_block_offload_under_ulysses_and_cfg_parallel_gives_the_one_rank_video(tmp_path, monkeypatch):
    """The streaming hooks beside the sequence-parallel hooks on the same blocks, on 4 gloo ranks (cfg 2 x Ulysses
    2) against one resident rank; tolerance as in test_parallel_pipeline (reordered float32 sums: a pixel may move
    by 1 level in under 0.1% of the values)."""
    import sys

    from test_parallel_pipeline import DRIVER, PROMPT, SEED, compile_tiny

    from telefuser.distributed.launch import run_local_ranks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    streamed = ("layer2.models.dit.offload_config.offload_type=ASYNC_CPU_OFFLOAD",
                "layer2.models.dit.offload_config.blocks_per_group=1")
    reference = telefuser.load_plan(str(compile_tiny(tmp_path, 1, []))).run(prompt=PROMPT, seed=SEED, progress=False)
    plan = compile_tiny(tmp_path, 4, ["cfg_degree=2", "sp_ulysses_degree=2"], streamed)
    out = tmp_path / "frames.npy"
    assert run_local_ranks([sys.executable, "-c", DRIVER, str(plan), PROMPT, str(SEED), str(out)], 4) == 0
    diff = np.abs(np.load(out).astype(int) - reference.frames.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"max {diff.max()}, differing {(diff > 0).mean()}"


@pytest.mark.parametrize("fp8", [True, False])
def test_fp8_layers_and_loras_stream_bit_identically(tmp_path, fp8):
    """recipes/tiny_fp8_lora.toml (LinearFP8 layers, whose weight and scale are buffers, with the LoRA unmerged
    beside them: LoraLinear), and the plain DiT with the LoRA merged: streamed in groups of one block, the DiT's
    output on fresh inputs is the resident one's, bit for bit (one forward: FP8 matmuls are slow on a CPU)."""
    shutil.copytree(TINY, tmp_path / "tiny")
    shutil.copy(TINY.parent / "tiny.toml", tmp_path / "tiny.toml")
    recipe = (TINY.parent / "tiny_fp8_lora.toml").read_text()
    if not fp8:  # merging into float8 weights is refused: the merged LoRA goes into the plain DiT
        recipe = recipe.replace("tiny/dit_fp8_scaled.safetensors", "tiny/dit.safetensors").replace(
            "attributes = { fp8 = true }", "").replace("merge = false", "merge = true")
    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 32, generator=g)
    outputs = []
    for name, extra in (("resident", ""), ("streamed", offload("dit", offload_type="ASYNC_CPU_OFFLOAD",
                                                                   blocks_per_group=1))):
        path = tmp_path / f"{name}.toml"
        path.write_text(recipe.replace("[[layer2.models.dit.lora_configs]]", extra + "[[layer2.models.dit.lora_configs]]"))
        plan_path = tmp_path / f"{name}.plan.json"
        plan = compile_recipe(path)
        plan_path.write_text(json.dumps(plan.model_dump(mode="json", by_alias=True)))
        placement = telefuser.load_plan(plan_path).placements["dit"]
        kinds = {type(m).__name__ for m in placement.module.blocks[0].modules()}
        assert ("LinearFP8" in kinds) == fp8 and ("LoraLinear" in kinds) == fp8
        assert (placement.streamer is not None) == (name == "streamed")
        if name == "streamed" and fp8:
            # the unmerged LoRA streams with its block, and the plan's group counts the file's share per block: at
            # least the packed group, at most 25% over it (the share also holds the alpha scalars and the bias /
            # norm differences, which merge into the base tensors: a fifth of this rank-4 file, about 1% at the
            # published rank 64)
            planned, packed = plan.memory.block_plan("dit").group_bytes, placement.streamer.slot_bytes
            assert packed <= planned <= 1.25 * packed
        with torch.inference_mode(), placement.active() as dit:
            outputs.append(dit(x, torch.tensor([800.0]), context))
    assert torch.equal(outputs[0], outputs[1])


def test_text_and_clip_encoders_on_the_cpu_in_an_image_to_video_plan(tmp_path):
    """tiny_i2v with both encoders run_on_cpu: their stages run on the CPU placement and the video is the resident
    plan's (same device here; on a GPU the outputs are copied to it)."""
    shutil.copytree(TINY, tmp_path / "tiny")
    shutil.copy(TINY.parent / "tiny.toml", tmp_path / "tiny.toml")  # which tiny_i2v.toml extends
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    frames = []
    for name, extra in (("resident", ""), ("cpu", "[layer2.models.text_encoder]\nrun_on_cpu = true\n"
                                                  "[layer2.models.image_encoder]\nrun_on_cpu = true\n")):
        path = tmp_path / f"{name}.toml"
        path.write_text((TINY.parent / "tiny_i2v.toml").read_text() + "\n" + extra)
        plan = compile_recipe(path, overrides=["layer2.num_inference_steps=1", "layer2.num_frames=5"])
        plan_path = tmp_path / f"{name}.plan.json"
        plan_path.write_text(json.dumps(plan.model_dump(mode="json", by_alias=True)))
        pipe = telefuser.load_plan(plan_path)
        frames.append(pipe.run(prompt="a cat", seed=2, image=image, progress=False).frames)
        if name == "cpu":
            assert {f"host_weights.{m}" for m in ("text_encoder", "image_encoder")} <= plan.memory.breakdown.keys()
            assert all(next(s for s in plan.memory.stages if s.stage == st).components["activations"] == 0
                       for st in ("encode_text", "encode_image"))
    assert np.array_equal(frames[0], frames[1])
