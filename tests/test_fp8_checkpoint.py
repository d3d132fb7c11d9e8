"""Pre-quantised FP8 DiT checkpoints in the published layouts, loaded as stored: layout detection from the header,
LinearFP8 layers over the file's own float8 bytes and scales, forward against the dequantised reference."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from compiler_fixtures import TINY, model_set, write_recipe
from telefuser.cli.compile import main as compile_main
from telefuser.compiler import compile_recipe
from telefuser.errors import RecipeError, WeightsError
from telefuser.models.tiny import BLOCK_LINEAR, fp8_checkpoint
from telefuser.models.wan import dit_keys
from telefuser.ops.quantized_linear import LinearFP8, _quantise
from telefuser.runtime.load.build import build_model
from telefuser.schema.fp8_keys import scan_fp8
from telefuser.schema.model_config import ModelRuntimeConfig, QuantConfig

BASE = load_file(TINY / "dit.safetensors")


def _comfy_quant(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's newer layout: per-tensor weight_scale, a comfy_quant JSON descriptor and a static input_scale."""
    out = fp8_checkpoint(state, "weight_scale", marker=False)
    for key in [k for k in out if k.endswith(".weight_scale")]:
        layer = key[: -len("weight_scale")]
        out[layer + "comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        out[layer + "input_scale"] = torch.tensor(1.0)
    return out


# layout id -> (state dict maker, granularity, scale key)
LAYOUTS = {
    "comfy_kj_scaled": (lambda s: fp8_checkpoint(s), "per_tensor", "scale_weight"),
    "lightx2v_per_channel": (lambda s: fp8_checkpoint(s, "weight_scale", per_channel=True, marker=False),
                             "per_channel", "weight_scale"),
    "comfy_quant": (_comfy_quant, "per_tensor", "weight_scale"),
    "plain_fp8": (lambda s: fp8_checkpoint(s, None), "unscaled", None),
}


def _write(folder, layout: str, keys: str = "wan"):
    folder = model_set(folder)
    state = LAYOUTS[layout][0](BASE)
    if keys == "diffusers":
        state = dit_keys.wan_to_diffusers(state)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "dit.safetensors")
    return folder, state


def _infos(state):
    return {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in state.items()}


def test_layouts_detected_from_names_dtypes_and_shapes():
    for layout, (make, granularity, scale_key) in LAYOUTS.items():
        found = scan_fp8(_infos(make(BASE)))
        assert (found.granularity, found.scale_key, found.marker) == (granularity, scale_key, layout == "comfy_kj_scaled")
        # 2 blocks x 10 linears (q, k, v, o of both attentions, ffn.0, ffn.2); everything else stays float32
        assert found.fp8_tensors == 20 and found.linear_parameters == sum(
            v.numel() for k, v in BASE.items() if BLOCK_LINEAR.match(k))
    assert scan_fp8(_infos(BASE)) is None


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.pop("blocks.1.ffn.2.scale_weight"), "1 float8 tensor(s) have no scale_weight/weight_scale beside them, "
                                                      "e.g. 'blocks.1.ffn.2.weight'"),
    (lambda s: [s.pop(k) for k in list(s) if k.endswith("scale_weight")], "no scale"),
    (lambda s: s.update({"blocks.0.ffn.0.weight": s["blocks.0.ffn.0.weight"].float().to(torch.float8_e5m2)}),
     "only float8_e4m3fn"),
    (lambda s: s.update({"blocks.0.ffn.0.scale_weight": torch.ones(4, 2)}), "not block-wise scales"),
    (lambda s: s.update({"head.head.scale_weight": torch.tensor(1.0)}), "not a float8_e4m3fn weight"),
])
def test_unloadable_fp8_files_refused(edit, needle):
    state = fp8_checkpoint(BASE)
    edit(state)
    with pytest.raises(ValueError) as err:
        scan_fp8(_infos(state))
    assert needle in str(err.value)


def _reference_dit(state: dict[str, torch.Tensor], planned):
    """The DiT with every float8 weight dequantised (weight * scale) into float32 nn.Linear layers."""
    import telefuser.models.registry as registry

    entry = registry.get("WanDiT")
    plain = {}
    for key, value in entry.convert(state, planned.key_layout).items():
        if value.dtype == torch.float8_e4m3fn:
            layer = key[: -len("weight")]
            scale = next((state_scale for suffix in ("scale_weight", "weight_scale")
                          if (state_scale := _own(state, planned, layer + suffix)) is not None), None)
            value = value.float() * (1.0 if scale is None else scale.float().reshape(-1, 1) if scale.numel() > 1
                                     else scale.float().reshape(()))
        plain[key] = value
    plain = {k: v for k, v in plain.items() if not k.endswith(("scale_weight", "weight_scale", "comfy_quant",
                                                             "input_scale")) and k != "scaled_fp8"}
    model = entry.model_class(entry.config_class(**planned.arch))
    model.load_state_dict(plain)
    return model.eval()


def _own(state, planned, key):
    return dit_keys.from_layout(state, planned.key_layout).get(key)


def _inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 6, 32, generator=g))


@pytest.mark.parametrize("layout,keys", [(layout, "wan") for layout in LAYOUTS] + [("comfy_kj_scaled", "diffusers"),
                                                                                   ("lightx2v_per_channel", "diffusers")])
def test_fp8_checkpoint_loads_as_stored(tmp_path, layout, keys):
    folder, state = _write(tmp_path, layout, keys)
    plan = compile_recipe(write_recipe(folder))
    planned = plan.model("dit")
    assert planned.key_layout == keys and planned.attributes.fp8
    assert planned.attributes.fp8_layout.granularity == LAYOUTS[layout][1]
    # the memory estimate: the float8 linears 1 byte, the other parameters 4 (float32 compute)
    fp8 = planned.attributes.fp8_layout.linear_parameters
    assert plan.memory.breakdown["weights.dit"] == (planned.parameter_count - fp8) * 4 + fp8
    assert dict(plan.dispatch_table("dit"))["linear"] == "fp8_scaled_mm"

    model = build_model(planned, ModelRuntimeConfig(), torch.device("cpu"))
    own = dit_keys.from_layout(state, keys)
    reference = _reference_dit(state, planned)
    ref_state = reference.state_dict()
    for name, module in model.named_modules():
        if BLOCK_LINEAR.match(name + ".weight"):
            assert isinstance(module, LinearFP8), name
            # the file's own float8 bytes, not a requantised copy; dequantised bit-exactly
            assert torch.equal(module.weight.view(torch.uint8), own[name + ".weight"].view(torch.uint8)), name
            assert torch.equal(module.dequantised_weight(), ref_state[name + ".weight"]), name
            assert module.rowwise == (LAYOUTS[layout][1] == "per_channel")
        elif isinstance(module, torch.nn.Linear):
            assert module.weight.dtype == torch.float32 and torch.equal(module.weight, ref_state[name + ".weight"])
    with torch.no_grad():
        out, expected = model(*_inputs()), reference(*_inputs())
    # Only the activations are rounded (weights are exactly the reference's): e4m3 keeps 3 mantissa bits, a
    # relative error up to 2^-4 per element, ~2% of a layer's output norm on average; through the 2 blocks' 20 FP8
    # linears, with the residual stream unquantised, the output stays within 5% (measured 2.1%).
    rel = ((out - expected).norm() / expected.norm()).item()
    assert 1e-4 < rel < 0.05, rel  # not zero: the FP8 path (activation quantisation) really ran


def test_linear_fp8_from_quantised_is_exact_on_its_operands():
    """torch._scaled_mm on the CPU (PyTorch's reference kernel) against float64 on the same float8 operands."""
    g = torch.Generator().manual_seed(3)
    weight, x, bias = torch.randn(48, 64, generator=g), torch.randn(2, 9, 64, generator=g), torch.randn(48, generator=g)
    for per_channel in (False, True):
        w8, scale = _quantise(weight, torch.float8_e4m3fn, per_channel)
        layer = LinearFP8.from_quantised(w8, scale, bias, torch.float32)
        out = layer(x)
        xq, xs = _quantise(x.reshape(-1, 64), torch.float8_e4m3fn, per_channel)
        ref = (xq.double() * xs.double()) @ (w8.double() * scale.double().reshape(-1, 1)).t() + bias.double()
        # float32 accumulation of 64 products: ~1e-7 relative
        assert ((out.reshape(-1, 48).double() - ref).norm() / ref.norm()).item() < 1e-6


def test_fp8_declarations_and_quantisation_checked_against_the_file(tmp_path):
    folder, _ = _write(tmp_path, "lightx2v_per_channel")
    with pytest.raises(WeightsError, match="fp8 = false, but the weights are stored as float8_e4m3fn"):
        compile_recipe(write_recipe(folder, dit_extra="attributes = { fp8 = false }", name="f.toml"))
    with pytest.raises(RecipeError, match="quant_type = 'fp8_e4m3fn'.*per channel scales.*\"fp8_e4m3fn_rowwise\""):
        compile_recipe(write_recipe(folder, layer2_extra="[layer2.models.dit.quant_config]\nquant_type = \"fp8_e4m3fn\"",
                                    name="q.toml"))
    with pytest.raises(RecipeError, match="needs a CUDA GPU"):  # the matching type quantises the rest on the fly
        compile_recipe(write_recipe(folder, layer2_extra="[layer2.models.dit.quant_config]\n"
                                    "quant_type = \"fp8_e4m3fn_rowwise\"", name="r.toml"))
    plain = model_set(tmp_path / "bf16")
    with pytest.raises(WeightsError, match="fp8 = true, but the weights are stored as float32"):
        compile_recipe(write_recipe(plain, dit_extra="attributes = { fp8 = true }", name="t.toml"))


def test_on_the_fly_fp8_keeps_the_float32_time_mlp(tmp_path):
    """quant_type on a float checkpoint still quantises at load, but never the time MLP (read as float32)."""
    planned = compile_recipe(write_recipe(model_set(tmp_path))).model("dit")
    runtime = ModelRuntimeConfig(quant_config=QuantConfig(quant_type="fp8_e4m3fn_rowwise"))
    model = build_model(planned, runtime, torch.device("cpu"))
    assert isinstance(model.blocks[0].self_attn.q, LinearFP8) and isinstance(model.head.head, LinearFP8)
    assert all(type(m) is torch.nn.Linear for m in (*model.time_embedding, model.time_projection[1])
               if not isinstance(m, torch.nn.SiLU))
    plain = build_model(planned, ModelRuntimeConfig(), torch.device("cpu"))
    with torch.no_grad():
        t_emb, e = model.time_embeddings(torch.tensor([500.0]))
        assert torch.equal(e, plain.time_embeddings(torch.tensor([500.0]))[1])


def test_fp8_file_missing_scales_exits_2_through_the_cli(tmp_path, capsys):
    folder = model_set(tmp_path)
    state = fp8_checkpoint(BASE)
    del state["blocks.0.self_attn.k.scale_weight"]
    save_file(state, folder / "dit.safetensors")
    out = tmp_path / "plan.json"
    assert compile_main([str(write_recipe(folder)), "-o", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and "'blocks.0.self_attn.k.weight'" in err and "re-download it" in err
    assert not out.exists()


def test_fp8_layout_recorded_in_the_plan_must_still_hold(tmp_path):
    folder, _ = _write(tmp_path, "comfy_kj_scaled")
    planned = compile_recipe(write_recipe(folder)).model("dit")
    edited = copy.deepcopy(planned.attributes.fp8_layout).model_copy(update={"granularity": "per_channel"})
    stale = planned.model_copy(update={"attributes": planned.attributes.model_copy(update={"fp8_layout": edited})})
    with pytest.raises(WeightsError, match="no longer have the FP8 layout the plan recorded"):
        build_model(stale, ModelRuntimeConfig(), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs fp8 tensor cores")
@pytest.mark.parametrize("layout", ["comfy_kj_scaled", "lightx2v_per_channel"])
def test_fp8_checkpoint_on_gpu(tmp_path, layout):
    """The same files loaded to the GPU (pinned staging reader) in bfloat16 compute, against the float32 CPU
    reference with the dequantised weights: FP8 activations (within 5%, as on the CPU) plus bf16 rounding."""
    folder, state = _write(tmp_path, layout)
    recipe = write_recipe(folder)
    recipe.write_text(recipe.read_text().replace('torch_dtype = "float32"', 'torch_dtype = "bfloat16"'))
    planned = compile_recipe(recipe, ["target.device=auto"]).model("dit")
    model = build_model(planned, ModelRuntimeConfig(), torch.device("cuda"))
    linear = model.blocks[0].ffn[2]
    assert isinstance(linear, LinearFP8) and linear.weight.is_cuda and linear.weight.dtype == torch.float8_e4m3fn
    reference = _reference_dit(state, planned.model_copy(update={"compute_dtype": "float32"}))
    with torch.no_grad():
        out = model(*(t.cuda() for t in _inputs())).float().cpu()
        expected = reference(*_inputs())
    assert ((out - expected).norm() / expected.norm()).item() < 0.06
