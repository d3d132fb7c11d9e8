"""Block streaming beyond Wan's DiT: the text encoders (umT5, Qwen2.5-VL) and HunyuanVideo-1.5's base and SR DiTs.

On the CPU the "device" is a second CPU buffer, so the ring, the hooks and the host chunks run for real: a streamed
plan must make the resident plan's video bit for bit (same kernels on the same values, read from other addresses),
and the compiler's group sizes must be the bytes the runtime packs. The official-size plans (Wan2.1-14B 480p on 8 GiB,
HunyuanVideo-1.5 T2V + SR on 24 GiB) are compiled against header-only files of the published shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import telefuser
from compiler_fixtures import model_set, write_recipe
from telefuser.compiler import compile_recipe
from telefuser.compiler.block_tensors import block_tensors
from telefuser.errors import PlanError
from telefuser.models import registry, tiny
from telefuser.models.hunyuan15 import tiny as hy_tiny
from telefuser.runtime.memory.block_offload import model_blocks
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GIB = 2**30
PROMPT, NEGATIVE = 'A red "STOP" sign in the rain', "blurry"


def offload(model: str, **config) -> str:
    items = ", ".join(f"{k} = {json.dumps(v)}" for k, v in config.items())
    return f"[layer2.models.{model}]\noffload_config = {{ {items} }}\n"


def host_spans(streamer) -> list[tuple[int, int]]:
    return [(c.data_ptr(), c.data_ptr() + c.numel()) for g in streamer.groups for c in g.chunks]


def inside(tensor: torch.Tensor, spans) -> bool:
    return any(lo <= tensor.data_ptr() < hi for lo, hi in spans)


# --- what the compiler knows of a block, checked against the model classes -------------------------------------------

UMT5 = {**tiny.TINY_ARCH["text_encoder"], "vocab_size": 300, "num_layers": 3}
QWEN = {**hy_tiny.TINY_ARCH["text_encoder"], "num_layers": 5}
HY_DIT = {**hy_tiny.TINY_ARCH["dit"], "double_blocks": 2, "single_blocks": 2}


@pytest.mark.parametrize("class_name, arch", [
    ("UMT5Encoder", UMT5), ("UMT5Encoder", {**UMT5, "shared_pos": True}), ("Qwen25VLTextEncoder", QWEN),
    ("HunyuanVideo15DiT", HY_DIT), ("HunyuanVideo15DiT", {**hy_tiny.TINY_ARCH["dit_sr"], "single_blocks": 1}),
    ("WanDiT", tiny.TINY_ARCH["dit"]),
])
def test_block_tensors_from_the_arch_are_the_model_classes(class_name, arch):
    entry = registry.get(class_name)
    with torch.device("meta"):
        model = entry.model_class(entry.config_class(**arch))
    blocks, _ = model_blocks(model)
    described = block_tensors(class_name, arch)
    assert [{n: s for n, s, _ in d} for d in described] == [
        {n: tuple(t.shape) for n, t in b.state_dict().items()} for b in blocks]
    for block, tensors in zip(blocks, described):  # "linear": exactly the nn.Linear weights (what quant_config swaps)
        linears = {f"{n}.weight" for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert {n for n, _, kind in tensors if kind == "linear"} == linears


def test_a_model_without_block_lists_is_not_streamed():
    from telefuser.models.hunyuan15.sr import SRUpsampler720p, SRUpsampler720pConfig

    with pytest.raises(ValueError, match="declares no BLOCK_LISTS"):
        model_blocks(SRUpsampler720p(SRUpsampler720pConfig(hidden_channels=8, num_blocks=1)))


# --- Wan: umT5 streamed ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan_set(tmp_path_factory):
    """The tiny Wan set with a 5-block umT5 (tiny's weights generator)."""
    folder = model_set(tmp_path_factory.mktemp("wan"))
    vocab = load_file(folder / "text_encoder.safetensors")["token_embedding.weight"].shape[0]
    arch = {**tiny.TINY_ARCH["text_encoder"], "vocab_size": vocab, "num_layers": 5}
    save_file(tiny.tiny_state_dict("text_encoder", arch), folder / "text_encoder.safetensors")
    return folder


def _load_wan(folder: Path, extra: str, name: str):
    plan = compile_recipe(write_recipe(folder, layer2_extra=extra, name=f"{name}.toml"))
    path = folder / f"{name}.plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return plan, telefuser.load_plan(path)


WAN_MODES = {
    "sequential_1": offload("text_encoder", offload_type="SEQUENTIAL_CPU_OFFLOAD", blocks_per_group=1),
    "async_1": offload("text_encoder", offload_type="ASYNC_CPU_OFFLOAD", blocks_per_group=1, prefetch_size=1),
    # blocks 1, 3, 4 streamed as [1, 3], [4]; blocks 0 and 2 stay with the embedding
    "async_2_ratio": offload("text_encoder", offload_type="ASYNC_CPU_OFFLOAD", blocks_per_group=2, prefetch_size=2,
                             offload_ratio=0.6),
    "with_dit": offload("text_encoder", offload_type="ASYNC_CPU_OFFLOAD", blocks_per_group=1)
    + offload("dit", offload_type="SEQUENTIAL_CPU_OFFLOAD", blocks_per_group=1),
}


@pytest.fixture(scope="module")
def wan_resident(wan_set):
    _, pipe = _load_wan(wan_set, "", "resident")
    return pipe, pipe.run(prompt="a red fox", seed=5, progress=False).frames


@pytest.mark.parametrize("mode", list(WAN_MODES))
def test_streamed_umt5_makes_the_resident_video_and_encoding(wan_set, wan_resident, mode):
    pipe_resident, expected = wan_resident
    plan, pipe = _load_wan(wan_set, WAN_MODES[mode], mode)
    for _ in range(2):  # the second video starts from the host copies again
        assert np.array_equal(pipe.run(prompt="a red fox", seed=5, progress=False).frames, expected)
    ids, mask = pipe.tokenizers["tokenizer"](["a shop sign that reads OPEN", "blue"])  # two lengths: padded keys
    with torch.inference_mode():
        with pipe_resident.placements["text_encoder"].active() as encoder:
            want = encoder(ids, mask)
        with pipe.placements["text_encoder"].active() as encoder:
            got = encoder(ids, mask)
    assert torch.equal(got, want)
    placement, b = pipe.placements["text_encoder"], plan.memory.block_plan("text_encoder")
    streamer = placement.streamer
    assert plan.placement_of("text_encoder").streamed_blocks == sum(len(g) for g in b.groups)
    # the estimate's bytes are the runtime's: one ring buffer, and the rest (embedding, norm, kept blocks)
    assert b.group_bytes == streamer.slot_bytes and not b.resident_between_uses
    assert b.resident_bytes == sum(t.numel() * t.element_size() for t in streamer.rest.state_dict().values())
    encode = next(s for s in plan.memory.stages if s.stage == "encode_text")
    assert encode.components["in_use.text_encoder"] == b.groups_resident * b.group_bytes + b.resident_bytes
    if b.prefetch_groups == 0 and b.groups_resident < len(b.groups):  # every forward copies every group once
        assert streamer.copies_in == 3 * len(b.groups)  # two videos and the direct call
    assert streamer.copies_in >= 3 * min(len(b.groups), b.groups_resident)
    # between uses the whole encoder is in host memory: streamed groups in their chunks, the rest offloaded whole
    assert not streamer.active and placement.weights.device_buffer is None
    spans = host_spans(streamer) + [(c.data_ptr(), c.data_ptr() + c.numel()) for c in placement.weights.chunks]
    assert all(inside(t, spans) for t in placement.module.state_dict().values())


# --- HunyuanVideo-1.5: Qwen2.5-VL, the base DiT and the SR DiT streamed ----------------------------------------------

@pytest.fixture(scope="module")
def hy15_set(tmp_path_factory):
    """The tiny HunyuanVideo-1.5 set with deeper models: a DiT of 3 double + 2 single blocks (two block sizes), an SR
    DiT of 3 + 1, a Qwen2.5-VL of 6 layers (4 run)."""
    folder = tmp_path_factory.mktemp("hy15")
    shutil.copytree(RECIPES / "tiny_hy15", folder / "tiny_hy15")
    for name in ("tiny_hy15.toml", "tiny_hy15_sr.toml"):
        shutil.copy(RECIPES / name, folder / name)
    deeper = {"dit": {"double_blocks": 3, "single_blocks": 2}, "dit_sr": {"double_blocks": 3, "single_blocks": 1},
              "text_encoder": {"num_layers": 6}}
    with pytest.MonkeyPatch.context() as patch:
        for role, changes in deeper.items():
            patch.setitem(hy_tiny.TINY_ARCH, role, {**hy_tiny.TINY_ARCH[role], **changes})
            save_file(hy_tiny.tiny_state_dict(role), str(folder / "tiny_hy15" / hy_tiny.FILES[role]),
                      metadata={"format": "pt"})
    return folder


def _load_hy15(folder: Path, name: str, *overrides: str):
    plan = compile_recipe(folder / "tiny_hy15_sr.toml", list(overrides))
    path = folder / f"{name}.plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return plan, telefuser.load_plan(str(path))


def _all(**config) -> list[str]:
    return [f"layer2.models.{m}.offload_config.{k}={v}" for m in ("text_encoder", "dit", "dit_sr")
            for k, v in config.items()]


HY15_MODES = {
    "sequential_1": _all(offload_type="SEQUENTIAL_CPU_OFFLOAD", blocks_per_group=1),
    "async_2_ahead_2_ratio": _all(offload_type="ASYNC_CPU_OFFLOAD", blocks_per_group=2, prefetch_size=2,
                                  offload_ratio=0.8),
}


@pytest.fixture(scope="module")
def hy15_resident(hy15_set):
    _, pipe = _load_hy15(hy15_set, "resident")
    return pipe.run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, progress=False).frames


@pytest.mark.parametrize("mode", list(HY15_MODES))
def test_streamed_hy15_models_make_the_resident_video(hy15_set, hy15_resident, mode):
    plan, pipe = _load_hy15(hy15_set, mode, *HY15_MODES[mode])
    for _ in range(2):
        frames = pipe.run(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, progress=False).frames
        assert np.array_equal(frames, hy15_resident)
    assert plan.memory.block_plan("dit").num_blocks == 5 and plan.memory.block_plan("text_encoder").num_blocks == 4
    for name in ("text_encoder", "dit", "dit_sr"):
        b, placement = plan.memory.block_plan(name), pipe.placements[name]
        streamer = placement.streamer
        # the ring buffer the compiler sized (the DiT's double and single blocks differ) is the one the runtime packs
        assert b.group_bytes == streamer.slot_bytes, name
        assert b.resident_bytes == sum(t.numel() * t.element_size() for t in streamer.rest.state_dict().values())
        assert streamer.copies_in >= 2 * len(b.groups) and not streamer.active, name
        assert not b.resident_between_uses and placement.weights.device_buffer is None, name  # one at a time


# --- HunyuanVideo-1.5 with FP8 / int8 linears (quant_config needs a CUDA target: compiled for an H100, the DiT built
# on this CPU by the runtime's own loader) ----------------------------------------------------------------------------

def _quantised_dit(folder: Path, quant: str, *overrides: str):
    from telefuser.runtime.load.build import build_model

    plan = compile_recipe(folder / "tiny_hy15_sr.toml", ["target.device=cuda", "target.gpu=H100",
                                                         "layer1.torch_dtype=bfloat16",
                                                         f"layer2.models.dit.quant_config.quant_type={quant}",
                                                         *overrides])
    module = build_model(plan.model("dit"), plan.layer2_inference_config.models["dit"], torch.device("cpu"))
    return plan, module


def _dit_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 2, 6, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 12, 256, generator=g)), \
        {"byt5_states": torch.randn(1, 4, 16, generator=g), "y": torch.zeros(1, 5, 2, 6, 8)}


def test_hy15_linears_quantised_stay_close_to_the_float_dit(hy15_set):
    """FP8 / int8 linears in the tiny DiT's blocks against its bfloat16 linears, on fresh inputs: the embedders, the
    token refiner and the output layer stay in the model dtype (KEEP_PRECISION_LINEARS). Tolerance, relative L2
    error of the velocity: 0.08 for float8_e4m3fn (3 mantissa bits: about 3% per quantised operand, weights and
    activations), 0.02 for int8 (7 bits). Measured: 0.026 (per tensor), 0.029 (per row), 0.0098 (int8)."""
    from telefuser.ops.quantized_linear import LinearFP8, LinearInt8

    args, kwargs = _dit_inputs()
    outputs = {}
    for quant in ("none", "fp8_e4m3fn", "fp8_e4m3fn_rowwise", "int8"):
        _, dit = _quantised_dit(hy15_set, quant)
        with torch.inference_mode():
            outputs[quant] = dit(*args, **kwargs).float()
        kinds = {type(m) for n, m in dit.named_modules() if n.startswith(("double_blocks.", "single_blocks."))}
        kept = {type(m) for n, m in dit.named_modules() if n.startswith(("time_in.", "txt_in.", "final_layer."))}
        if quant != "none":
            assert (LinearInt8 if quant == "int8" else LinearFP8) in kinds and nn.Linear not in kinds
            assert nn.Linear in kept and not {LinearFP8, LinearInt8} & kept
    ref = outputs.pop("none")
    for quant, out in outputs.items():
        error = float((out - ref).norm() / ref.norm())
        assert 0 < error < (0.02 if quant == "int8" else 0.08), f"{quant}: relative error {error:.4f}"


@pytest.mark.parametrize("quant", ["fp8_e4m3fn_rowwise", "int8"])
def test_quantised_hy15_dit_streams_bit_identically(hy15_set, quant):
    """LinearFP8 / LinearInt8 (weights and scales are buffers) in streamed groups: the plan's ring buffer is the
    packed group (8-bit weights plus float32 scales; int8's float32 biases), and the output is the resident one's."""
    from telefuser.runtime.memory.placement import Placement

    args, kwargs = _dit_inputs()
    _, resident = _quantised_dit(hy15_set, quant)
    plan, module = _quantised_dit(hy15_set, quant, "layer2.models.dit.offload_config.offload_type=ASYNC_CPU_OFFLOAD",
                                  "layer2.models.dit.offload_config.blocks_per_group=2")
    b = plan.memory.block_plan("dit")
    placement = Placement(module, torch.device("cpu"), False, pin=False, blocks=b)
    assert b.group_bytes == placement.streamer.slot_bytes
    with torch.inference_mode():
        want = resident(*args, **kwargs)
        with placement.active() as dit:
            got = dit(*args, **kwargs)
    # every group copied in once, and the first again at the last (copied ahead for a next forward)
    assert torch.equal(got, want) and placement.streamer.copies_in == len(b.groups) + b.prefetch_groups


# --- the official-size plans ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    from bench.compile import build_model_root

    root = tmp_path_factory.mktemp("root")
    build_model_root(root)  # the published files' headers, no data
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TELEFUSER_MODEL_ROOT", str(root))
        yield root


def _stage(plan, name: str):
    return next(s for s in plan.memory.stages if s.stage == name)


def test_wan21_14b_480p_fits_8_gib_with_the_encoder_streamed(model_root):
    base, shipped = RECIPES / "wan21_t2v_14b.toml", RECIPES / "wan21_t2v_14b_480p_8gib.toml"
    small = ["target.gpu=RTX4090", "target.memory_gib=8", "layer3.resolution.default=480p",
             "layer3.resolution.choices=[\"480p\"]"]
    with pytest.raises(PlanError) as info:  # the H100 recipe on 8 GiB: the refusal names the streaming that fits
        compile_recipe(base, small)
    message = " ".join(str(info.value).split())
    assert ("--set layer2.models.dit.offload_config.offload_type=ASYNC_CPU_OFFLOAD --set layer2.models.text_encoder."
            "offload_config.offload_type=ASYNC_CPU_OFFLOAD (5.3 GiB)") in message
    plan = compile_recipe(shipped)
    assert plan.memory.capacity_bytes == 8 * GIB and plan.memory.peak_bytes <= 8 * GIB
    te = plan.placement_of("text_encoder")
    assert (te.offload_type, te.streamed_blocks, te.pinned, te.load_device) == ("ASYNC_CPU_OFFLOAD", 24, True, "cpu")
    encode = _stage(plan, "encode_text")
    b = plan.memory.block_plan("text_encoder")
    # umT5-XXL's 24 blocks of 368 MiB in a ring of two; the 2 GiB token embedding copied in for the stage only
    assert b.groups == [[i] for i in range(24)] and b.groups_resident == 2
    assert 1.9 * GIB < b.resident_bytes < 2.0 * GIB and encode.peak_bytes < 5 * GIB
    # the encoder whole (model offload) does not fit: its 10.6 GiB alone are over
    with pytest.raises(PlanError, match=r"largest in stage encode_text"):
        compile_recipe(shipped, ["layer2.models.text_encoder.offload_config.offload_type=MODEL_CPU_OFFLOAD"])


def test_hy15_t2v_sr_fits_24_gib_with_the_encoder_and_dits_streamed(model_root):
    with pytest.raises(PlanError) as info:  # the H100 recipe on 24 GiB: the DiTs' streaming is among what fits
        compile_recipe(RECIPES / "hunyuan15_t2v_480p_sr_720p.toml", ["target.gpu=RTX4090"])
    assert ("--set layer2.models.dit.offload_config.offload_type=ASYNC_CPU_OFFLOAD --set layer2.models.dit_sr."
            "offload_config.offload_type=ASYNC_CPU_OFFLOAD (16.3 GiB)") in " ".join(str(info.value).split())
    plan = compile_recipe(RECIPES / "hunyuan15_t2v_480p_sr_720p_24gib.toml")
    assert plan.memory.capacity_bytes == 24 * GIB and plan.memory.peak_bytes <= 24 * GIB
    blocks = {b.model: b for b in plan.memory.block_offload}
    assert {m: b.num_blocks for m, b in blocks.items()} == {"dit": 54, "dit_sr": 54, "text_encoder": 26}
    assert not any(b.resident_between_uses for b in blocks.values())  # one of the three on the device at a time
    encode = _stage(plan, "encode_text")
    assert encode.components["in_use.text_encoder"] < 2 * GIB  # against 12.3 GiB for Qwen2.5-VL whole
    # the largest stage is the SR DiT's at 720p: its activations, not weights
    worst = max(plan.memory.stages, key=lambda s: s.peak_bytes)
    assert worst.stage == "super_resolve" and worst.components["activations"] > worst.components["in_use.dit_sr"]
    # with the text encoder copied in whole instead, its stage holds 12.3 GiB more
    whole = compile_recipe(RECIPES / "hunyuan15_t2v_480p_sr_720p_24gib.toml",
                           ["layer2.models.text_encoder.offload_config.offload_type=MODEL_CPU_OFFLOAD"])
    assert _stage(whole, "encode_text").peak_bytes - encode.peak_bytes > 10 * GIB
