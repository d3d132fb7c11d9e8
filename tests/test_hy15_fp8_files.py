"""Pre-quantised FP8 HunyuanVideo-1.5 DiT files in the layouts LightX2V writes, loaded as stored through the tiny
recipe (recipes/tiny_hy15.toml): the plan records the layout, the DiT's output equals (within the activation
rounding) the DiT built from the same dequantised weights, and layouts not established are refused at compile
time naming the file (exit 2).

The files are written here from the tiny DiT's float32 weights with LightX2V's published rule (ModelTC/LightX2V
f8aee98, tools/convert/converter.py model type `hunyuan_dit` + tools/convert/quant/quant.py "fp8"):
- which tensors: the 2-D weights `double_blocks.<i>.<name>...` whose name is one of TARGETS (14 linears per block);
  every other tensor float32 (the converter's default `--non_linear_dtype`);
- per output row (the published `hy1.5_t2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors`): s = max(|w|, 1e-5)
  / 448 as `<layer>.weight_scale` [out, 1], weight = e4m3(w / s);
- `--comfyui_mode`: one s = max|w| / 448 per tensor as `<layer>.scale_weight`, plus `scaled_fp8` (2 float8 zeros).
The e4m3 rounding is torch's cast (round to nearest even; qtorch's `float_quantize(.., "nearest")` in LightX2V
differs at most on exact ties), so the bytes may differ from LightX2V's on ties, never the layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from telefuser.cli.compile import main as compile_main
from telefuser.compiler import compile_recipe
from telefuser.models import registry
from telefuser.models.hunyuan15.tiny import TINY_ARCH
from telefuser.ops.quantized_linear import LinearFP8
from telefuser.runtime.load.build import build_model
from telefuser.schema.model_config import ModelRuntimeConfig

from hy15_fixtures import link_tiny_hy15, tiny_dit_inputs

REPO = Path(__file__).resolve().parents[1]
BASE = load_file(REPO / "recipes" / "tiny_hy15" / "hy15_dit.safetensors")
TARGETS = ("img_mod", "img_attn_q", "img_attn_k", "img_attn_v", "img_attn_proj", "img_mlp",
           "txt_mod", "txt_attn_q", "txt_attn_k", "txt_attn_v", "txt_attn_proj", "txt_mlp")
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _quantised(key: str, value: torch.Tensor) -> bool:
    parts = key.split(".")
    return value.dim() == 2 and len(parts) > 2 and parts[0] == "double_blocks" and parts[2] in TARGETS


def lightx2v_file(state: dict[str, torch.Tensor], comfyui_mode: bool = False,
                  also: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state as LightX2V's converter writes it (`also`: further 2-D weights quantised the same way)."""
    out = {}
    for key, w in state.items():
        if not (_quantised(key, w) or key in also):
            out[key] = w.float()
            continue
        w = w.float()
        if comfyui_mode:
            s = w.abs().max() / E4M3_MAX
            out[key[: -len("weight")] + "scale_weight"] = s
        else:
            s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / E4M3_MAX
            out[key + "_scale"] = s  # <layer>.weight_scale
        out[key] = (w / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    if comfyui_mode:
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return out


def dequantised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """weight * scale in float32 for every float8 weight; scales and marker dropped."""
    out = {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith(("weight_scale", "scale_weight")):
            continue
        if value.dtype == torch.float8_e4m3fn:
            layer = key[: -len("weight")]
            scale = state.get(layer + "weight_scale", state.get(layer + "scale_weight"))
            value = value.float() * scale.float()
        out[key] = value
    return out


def _folder(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "dit_fp8.safetensors") -> Path:
    folder = tmp_path / "set"
    folder.mkdir(exist_ok=True)
    link_tiny_hy15(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
    text = (REPO / "recipes" / "tiny_hy15.toml").read_text()
    text = text.replace('path = "tiny_hy15/hy15_dit.safetensors"', f'path = "{name}"\nattributes = {{ fp8 = true }}')
    (folder / "fp8.toml").write_text(text)
    return folder / "fp8.toml"




def _reference(state: dict[str, torch.Tensor]) -> nn.Module:
    entry = registry.get("HunyuanVideo15DiT")
    model = entry.model_class(entry.config_class(**TINY_ARCH["dit"]))
    model.load_state_dict(dequantised(state))
    return model.eval()


LAYOUTS = {  # id -> (file maker, granularity, scale key, marker)
    "lightx2v": (lambda: lightx2v_file(BASE), "per_channel", "weight_scale", False),
    "lightx2v_comfyui_mode": (lambda: lightx2v_file(BASE, comfyui_mode=True), "per_tensor", "scale_weight", True),
    # also the output layer in float8: a KEEP_PRECISION linear, dequantised into an nn.Linear on loading
    "lightx2v_final_layer": (lambda: lightx2v_file(BASE, also=("final_layer.linear.weight",)), "per_channel",
                             "weight_scale", False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_file_loads_as_stored(tmp_path, layout):
    make, granularity, scale_key, marker = LAYOUTS[layout]
    state = make()
    plan = compile_recipe(_folder(tmp_path, state))
    planned = plan.model("dit")
    found = planned.attributes.fp8_layout
    assert planned.attributes.fp8 and planned.key_layout == "tencent"
    assert (found.granularity, found.scale_key, found.marker) == (granularity, scale_key, marker)
    quantised = [k for k, v in BASE.items() if _quantised(k, v)]
    assert len(quantised) == 14 * TINY_ARCH["dit"]["double_blocks"]
    extra = 1 if layout == "lightx2v_final_layer" else 0
    assert found.fp8_tensors == len(quantised) + extra
    assert found.linear_parameters == sum(state[k].numel() for k in state if state[k].dtype == torch.float8_e4m3fn
                                          and k != "scaled_fp8")
    # the estimate: float8 linears 1 byte, every other parameter (scales included) 4 (float32 compute)
    assert plan.memory.breakdown["weights.dit"] == (planned.parameter_count - found.linear_parameters) * 4 + \
        found.linear_parameters
    assert dict(plan.dispatch_table("dit"))["linear"] == "fp8_scaled_mm"

    model = build_model(planned, ModelRuntimeConfig(), torch.device("cpu"))
    reference = _reference(state)
    ref = reference.state_dict()
    fp8_modules = 0
    for name, module in model.named_modules():
        if isinstance(module, LinearFP8):
            fp8_modules += 1
            assert _quantised(name + ".weight", BASE[name + ".weight"]), name
            # the file's own float8 bytes, dequantised exactly as the reference
            assert torch.equal(module.weight.view(torch.uint8), state[name + ".weight"].view(torch.uint8)), name
            assert torch.equal(module.dequantised_weight(), ref[name + ".weight"]), name
            assert module.rowwise == (granularity == "per_channel")
        elif isinstance(module, nn.Linear):
            assert module.weight.dtype == torch.float32 and torch.equal(module.weight, ref[name + ".weight"]), name
    assert fp8_modules == len(quantised)
    with torch.no_grad():
        out, expected = model(**tiny_dit_inputs()), reference(**tiny_dit_inputs())
    # The weights are the reference's exactly; only the activations entering the 28 FP8 linears are rounded to
    # e4m3 (3 mantissa bits: up to 2^-4 relative per element, ~2-3% of a layer's output norm), per row or per
    # tensor as the weight scales. Through 2 double-stream blocks (residual stream, modulation and attention
    # unquantised) the velocity stays within 3% (measured 1.1% per row, 1.2% per tensor); not zero: the FP8 path ran.
    rel = ((out - expected).norm() / expected.norm()).item()
    assert 1e-4 < rel < 0.03, rel


def _compile_refusal(tmp_path, capsys, state, name="dit_fp8.safetensors") -> str:
    recipe = _folder(tmp_path, state, name)
    assert compile_main([str(recipe), "-o", str(tmp_path / "plan.json")]) == 2
    assert not (tmp_path / "plan.json").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("edit,needle", [
    # plain float8 weights without scales: no publisher writes HY1.5 so
    (lambda s: {k: v for k, v in s.items() if not k.endswith("weight_scale")}, "unscaled scales"),
    # ComfyUI's newer per-layer format: static input scales / comfy_quant descriptors
    (lambda s: {**s, "double_blocks.0.img_attn_q.input_scale": torch.tensor(1.0)}, "input_scale"),
    # one weight_scale per tensor without a marker: not what LightX2V writes
    (lambda s: {k: (v.amax().reshape(()) if k.endswith("weight_scale") else v) for k, v in s.items()},
     "per tensor scales (weight_scale)"),
])
def test_unestablished_layouts_refused_naming_the_file(tmp_path, capsys, edit, needle):
    err = _compile_refusal(tmp_path, capsys, edit(lightx2v_file(BASE)))
    assert "dit_fp8.safetensors" in err and "FP8 HunyuanVideo-1.5 DiT" in err and needle in err, err


def test_comfyui_module_names_refused(tmp_path, capsys):
    """ComfyUI's HunyuanVideo model is Flux's DoubleStreamBlock (fused img_attn.qkv): its files are not read."""
    state = lightx2v_file(BASE)
    for i in range(TINY_ARCH["dit"]["double_blocks"]):
        p = f"double_blocks.{i}."
        state[p + "img_attn.qkv.weight"] = torch.cat([state.pop(p + f"img_attn_{x}.weight") for x in "qkv"])
    err = _compile_refusal(tmp_path, capsys, state, "hunyuanvideo1.5_fp8_scaled.safetensors")
    assert "hunyuanvideo1.5_fp8_scaled.safetensors" in err and "ComfyUI's module names" in err, err


def test_fp8_declared_on_another_hy15_model_refused_without_weights(tmp_path, capsys):
    text = (REPO / "recipes" / "tiny_hy15.toml").read_text().replace(
        'path = "tiny_hy15/hy15_vae.safetensors"', 'path = "tiny_hy15/hy15_vae.safetensors"\nattributes = { fp8 = true }')
    folder = tmp_path / "set"
    folder.mkdir()
    link_tiny_hy15(folder)
    (folder / "vae_fp8.toml").write_text(text)
    assert compile_main(["--check", "--no-weights", str(folder / "vae_fp8.toml")]) != 0
    captured = capsys.readouterr()
    assert "only HunyuanVideo-1.5's DiT is read from an FP8 file" in captured.out + captured.err


def test_shipped_fp8_recipe_names_the_published_file():
    from telefuser.compiler import load_recipe

    recipe = load_recipe(REPO / "recipes" / "hunyuan15_t2v_480p_lightx2v_4step_fp8.toml").recipe
    dit = next(m for m in recipe.layer1.models if m.name == "dit")
    assert dit.path.endswith("Hy1.5-Distill-Models/hy1.5_t2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors")
    assert dit.attributes.fp8 and dit.attributes.distill
    assert recipe.layer2.denoising_step_list == [1000, 750, 500, 250]


def _write_header(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """A safetensors file of these (dtype, shape)s with the full size but no data on disk; returns its size."""
    import json
    import math
    import struct

    itemsize = {"F8_E4M3": 1, "F32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return 8 + len(text) + offset


def test_shipped_fp8_recipe_on_the_published_layout_at_full_size(tmp_path, monkeypatch):
    """The 8.3B DiT written by LightX2V's rule as a header (the 54 x 14 block linears float8 with [out, 1] float32
    scales, the rest float32): the file comes out 8,858,832,424 bytes, the published file's listed 8.85 GB (so the rule
    covers what the published file quantises), and the shipped recipe compiles on it for an H100."""
    from dataclasses import asdict

    from bench.hy15_files import _shapes, write_hunyuan15_root
    from telefuser.models.hunyuan15.dit_config import HUNYUAN15_8B

    write_hunyuan15_root(tmp_path)
    tensors = {}
    for key, shape in _shapes("HunyuanVideo15DiT", **asdict(HUNYUAN15_8B)).items():
        if len(shape) == 2 and _quantised(key, torch.empty(0, 0)):
            tensors[key] = ("F8_E4M3", shape)
            tensors[key + "_scale"] = ("F32", (shape[0], 1))
        else:
            tensors[key] = ("F32", shape)
    size = _write_header(tmp_path / "Hy1.5-Distill-Models" / "hy1.5_t2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors",
                         tensors)
    assert abs(size - 8.85e9) < 0.05e9, size
    monkeypatch.setenv("TELEFUSER_MODEL_ROOT", str(tmp_path))
    plan = compile_recipe(REPO / "recipes" / "hunyuan15_t2v_480p_lightx2v_4step_fp8.toml")
    dit = plan.model("dit")
    layout = dit.attributes.fp8_layout
    assert (layout.granularity, layout.scale_key, layout.fp8_tensors) == ("per_channel", "weight_scale", 54 * 14)
    assert 8.1e9 < layout.linear_parameters < 8.2e9 and 8.3e9 < dit.parameter_count < 8.4e9
    # the estimate: the float8 linears 1 byte, the other ~0.18e9 parameters in bfloat16
    assert plan.memory.breakdown["weights.dit"] == (dit.parameter_count - layout.linear_parameters) * 2 + \
        layout.linear_parameters
    assert plan.memory.breakdown["weights.dit"] < 8.6e9 and plan.memory.peak_bytes < plan.memory.capacity_bytes
    assert dict(plan.dispatch_table("dit"))["linear"] == "fp8_scaled_mm"
    with pytest.raises(Exception, match="compute capability >= 8.9"):  # an A100 has no float8 tensor cores
        compile_recipe(REPO / "recipes" / "hunyuan15_t2v_480p_lightx2v_4step_fp8.toml", ["target.gpu=A100"])
