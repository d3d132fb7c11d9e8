"""LoRA on HunyuanVideo-1.5's DiT, in the layout Tencent's trainer writes (tencent/HunyuanVideo-1.5 `train.py`: PEFT
`LoraConfig(r, lora_alpha, target_modules="all-linear")` on its transformer, saved by the transformer's
`save_lora_adapter` as `pytorch_lora_weights.safetensors`: `<module>.lora_A.weight` [r, in] / `.lora_B.weight`
[out, r] in Tencent's module names, the LoraConfig as JSON in the safetensors metadata `lora_adapter_metadata`) and
ComfyUI's (`diffusion_model.<module>.lora_down/lora_up/alpha`), on the tiny DiT of recipes/tiny_hy15.toml: the DiT's
output against the DiT whose weights were merged by hand in float64, merged and unmerged; strength 0 equal to no
LoRA; wrong files refused at compile time (exit 2, the file named)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from telefuser.cli.compile import main as compile_main
from telefuser.compiler import compile_recipe
from telefuser.models import registry
from telefuser.models.hunyuan15.tiny import TINY_ARCH
from telefuser.ops.lora_linear import LoraLinear
from telefuser.runtime.load.build import build_model
from telefuser.schema.model_config import ModelRuntimeConfig

from hy15_fixtures import link_tiny_hy15, tiny_dit_inputs

REPO = Path(__file__).resolve().parents[1]
BASE = load_file(REPO / "recipes" / "tiny_hy15" / "hy15_dit.safetensors")
RANK, ALPHA = 4, 8.0  # scale alpha / r = 2, as the trainer's defaults (r 8, lora_alpha 16)
LORA_FILE = "lora/default/pytorch_lora_weights.safetensors"  # train.py: <checkpoint>/lora/<adapter>/<weight name>


def _linears() -> list[str]:
    """Every nn.Linear of the tiny DiT: what PEFT's "all-linear" wraps on a model that is no PreTrainedModel."""
    entry = registry.get("HunyuanVideo15DiT")
    with torch.device("meta"):
        model = entry.model_class(entry.config_class(**TINY_ARCH["dit"]))
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


LINEARS = _linears()


def _factors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [r, in], B [out, r]), B sized so that the update is ~30% of W."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name in LINEARS:
        o, i = BASE[name + ".weight"].shape
        a = torch.randn(RANK, i, generator=g) / i ** 0.5
        b = torch.randn(o, RANK, generator=g) * 0.3 / (RANK * i) ** 0.5
        out[name] = (a, b)
    return out


FACTORS = _factors()


def _peft_metadata(**extra) -> dict[str, str]:
    config = {"r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(LINEARS), "peft_type": "LORA",
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "rank_pattern": {},
              "alpha_pattern": {}, "task_type": "FEATURE_EXTRACTION", **extra}
    # as Tencent's save_lora_adapter writes it
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}


def _tencent(factors=FACTORS) -> dict[str, torch.Tensor]:
    return {k: v for name, (a, b) in factors.items()
            for k, v in ((f"{name}.lora_A.weight", a), (f"{name}.lora_B.weight", b))}


def _comfy(factors=FACTORS) -> dict[str, torch.Tensor]:
    return {k: v for name, (a, b) in factors.items()
            for k, v in ((f"diffusion_model.{name}.lora_down.weight", a), (f"diffusion_model.{name}.lora_up.weight", b),
                         (f"diffusion_model.{name}.alpha", torch.tensor(ALPHA)))}


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "set"
    folder.mkdir()
    link_tiny_hy15(folder)
    shutil.copy(REPO / "recipes" / "tiny_hy15.toml", folder / "tiny_hy15.toml")
    return folder


def _write(folder: Path, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def _recipe(folder: Path, name: str, loras: list[tuple[str, float]], merge: bool = True) -> Path:
    text = (folder / "tiny_hy15.toml").read_text()
    for rel, strength in loras:
        text += (f"\n[[layer2.models.dit.lora_configs]]\npath = \"{rel}\"\nstrength = {strength}\n"
                 f"merge = {str(merge).lower()}\n")
    path = folder / name
    path.write_text(text)
    return path


def _dit(recipe: Path):
    plan = compile_recipe(recipe)
    runtime = plan.layer2_inference_config.models.get("dit", ModelRuntimeConfig())
    return plan.model("dit"), build_model(plan.model("dit"), runtime, torch.device("cpu"))




def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_dit_inputs())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(the DiT without LoRA, its output, the output of the DiT merged by hand: W + strength alpha/r B A in float64,
    rounded once to float32)."""
    folder = _folder(tmp_path_factory.mktemp("ref"))
    _, model = _dit(folder / "tiny_hy15.toml")
    plain = _run(model)
    outputs = {}
    for strength in (1.0, 0.6):
        merged = {k: v.double() for k, v in BASE.items()}
        for name, (a, b) in FACTORS.items():
            merged[name + ".weight"] += strength * (ALPHA / RANK) * (b.double() @ a.double())
        model.load_state_dict({k: v.float() for k, v in merged.items()})
        outputs[strength] = _run(model)
    model.load_state_dict(BASE)
    return model, plain, outputs


@pytest.mark.parametrize("layout", ["tencent", "comfy"])
@pytest.mark.parametrize("merge", [True, False])
def test_lora_equals_the_dit_merged_by_hand(tmp_path, reference, layout, merge):
    _, plain, outputs = reference
    folder = _folder(tmp_path)
    if layout == "tencent":
        _write(folder, LORA_FILE, _tencent(), _peft_metadata())
    else:
        _write(folder, LORA_FILE, _comfy(), {"format": "pt"})
    planned, model = _dit(_recipe(folder, "r.toml", [(LORA_FILE, 0.6)], merge=merge))
    (recorded,) = planned.loras
    assert recorded.key_layout == "tencent" and recorded.matched == recorded.modules == len(LINEARS)
    assert recorded.linears_covered == len(LINEARS)  # every linear: the trainer's "all-linear"
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    if merge:
        assert not wrapped
    else:  # the blocks' linears run the LoRA beside them; the embedders and output layer are merged
        assert wrapped == {n for n in LINEARS if n.startswith(("double_blocks.", "single_blocks."))}
        assert torch.equal(model.double_blocks[0].img_attn_q.base.weight, BASE["double_blocks.0.img_attn_q.weight"])
    out = _run(model)
    # The LoRA moves the output away from the plain DiT's (relative L2 0.052) ...
    assert _rel(out, plain) > 0.02
    # ... and to the hand-merged DiT's up to float32 rounding: merged, the runtime adds the float32 update to the
    # float32 weight (one extra rounding of each weight against the float64 merge, <= 1 ulp = 6e-8 relative);
    # unmerged, W x + up (down x) sums the same products in another order. Through the embedders, the refiner, 2
    # double-stream blocks and the final layer that stays ~1e-7 relative (measured 1.4e-7 merged, 2.0e-7
    # unmerged); 1e-5 leaves 50x headroom and is 3 orders below the LoRA's own effect.
    assert _rel(out, outputs[0.6]) < 1e-5


def test_strength_zero_equals_no_lora_and_two_loras_add(tmp_path, reference):
    _, plain, outputs = reference
    folder = _folder(tmp_path)
    _write(folder, LORA_FILE, _tencent(), _peft_metadata())
    _write(folder, "comfy.safetensors", _comfy(), None)
    for merge in (True, False):
        _, model = _dit(_recipe(folder, f"zero_{merge}.toml", [(LORA_FILE, 0.0)], merge=merge))
        assert torch.equal(_run(model), plain)  # W + 0 and W x + 0: bit for bit
    # the two layouts of the same factors at 0.6 and 0.4: the hand merge at strength 1
    _, model = _dit(_recipe(folder, "two.toml", [(LORA_FILE, 0.6), ("comfy.safetensors", 0.4)]))
    assert _rel(_run(model), outputs[1.0]) < 1e-5


def test_peft_alpha_patterns_and_a_file_without_its_config(tmp_path, reference):
    """alpha_pattern / use_rslora as PEFT scales them; a pipeline-saved file (prefixed keys and config); no
    LoraConfig in the file: scale 1 (diffusers: alpha = r)."""
    _, plain, outputs = reference
    folder = _folder(tmp_path)
    # rslora with alpha 4: 4 / sqrt(4) = 2 = the reference's alpha / r
    _write(folder, "rs.safetensors", _tencent(), _peft_metadata(lora_alpha=4.0, use_rslora=True))
    _, model = _dit(_recipe(folder, "rs.toml", [("rs.safetensors", 1.0)]))
    assert _rel(_run(model), outputs[1.0]) < 1e-5
    # alpha 1 everywhere but alpha_pattern gives every module (regex ".*" matches each name) alpha 8
    _write(folder, "pat.safetensors", _tencent(), _peft_metadata(lora_alpha=1.0, alpha_pattern={".*": ALPHA}))
    _, model = _dit(_recipe(folder, "pat.toml", [("pat.safetensors", 1.0)]))
    assert _rel(_run(model), outputs[1.0]) < 1e-5
    # a pipeline's save_lora_weights: "transformer." keys, the config's keys under the same prefix in the metadata
    packed = {f"transformer.{k}": v for k, v in json.loads(_peft_metadata()["lora_adapter_metadata"]).items()}
    _write(folder, "pipe.safetensors", {f"transformer.{k}": v for k, v in _tencent().items()},
           {"format": "pt", "lora_adapter_metadata": json.dumps(packed)})
    _, model = _dit(_recipe(folder, "pipe.toml", [("pipe.safetensors", 1.0)]))
    assert _rel(_run(model), outputs[1.0]) < 1e-5
    # no config: scale 1, i.e. strength 2 of the file is the reference at strength 1
    _write(folder, "bare.safetensors", _tencent(), {"format": "pt"})
    _, model = _dit(_recipe(folder, "bare.toml", [("bare.safetensors", ALPHA / RANK)]))
    assert _rel(_run(model), outputs[1.0]) < 1e-5


def _refused(folder: Path, recipe: Path, capsys) -> str:
    out = folder / "plan.json"
    capsys.readouterr()
    assert compile_main([str(recipe), "-o", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and not out.exists()
    return err


def test_wrong_files_refused_at_compile_time_with_the_file_named(tmp_path, capsys):
    folder = _folder(tmp_path)
    # a module the tiny DiT lacks (it has 2 double-stream blocks)
    extra = {"double_blocks.5.img_attn_q": (torch.ones(RANK, 64), torch.ones(64, RANK))}
    _write(folder, "extra.safetensors", _tencent({**FACTORS, **extra}), _peft_metadata())
    err = _refused(folder, _recipe(folder, "extra.toml", [("extra.safetensors", 1.0)]), capsys)
    assert str(folder / "extra.safetensors") in err and "lora_configs[0]" in err
    assert f"matched {len(LINEARS)} of {len(LINEARS) + 1} LoRA modules" in err
    assert "double_blocks.5.img_attn_q: no such weight" in err
    # Wan module names on the HunyuanVideo-1.5 DiT
    _write(folder, "wan.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(RANK, 64),
                                       "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(64, RANK)},
           None)
    err = _refused(folder, _recipe(folder, "wan.toml", [("wan.safetensors", 1.0)]), capsys)
    assert str(folder / "wan.safetensors") in err and "matched 0 of 1 LoRA modules" in err
    # a DoRA, and a LoraConfig whose rank is not the tensors'
    _write(folder, "dora.safetensors", _tencent(), _peft_metadata(use_dora=True))
    err = _refused(folder, _recipe(folder, "dora.toml", [("dora.safetensors", 1.0)]), capsys)
    assert str(folder / "dora.safetensors") in err and "DoRA" in err
    _write(folder, "rank.safetensors", _tencent(), _peft_metadata(r=8))
    err = _refused(folder, _recipe(folder, "rank.toml", [("rank.safetensors", 1.0)]), capsys)
    assert str(folder / "rank.safetensors") in err and "rank 8" in err and f"has {RANK} rows" in err
    # a LoRA on a HunyuanVideo-1.5 model that is no DiT
    text = (folder / "tiny_hy15.toml").read_text() + (
        "\n[[layer2.models.vae.lora_configs]]\npath = \"extra.safetensors\"\nstrength = 1.0\n")
    (folder / "vae.toml").write_text(text)
    err = _refused(folder, folder / "vae.toml", capsys)
    assert "layer2.models.vae.lora_configs" in err and "HunyuanVideo15VAE" in err


def _diffusers_name(module: str) -> list[str]:
    from telefuser.models.hunyuan15.dit_keys import tencent_to_diffusers

    return [k.removesuffix(".weight") for k in tencent_to_diffusers({module + ".weight": torch.zeros(6, 1)})]


def test_diffusers_names_and_a_diffusers_checkpoint(tmp_path, reference, monkeypatch):
    """A LoRA in diffusers' names (transformer. + HunyuanVideo15Transformer3DModel's modules, PEFT keys) against the
    hand merge done in diffusers' layout (float64) and converted to Tencent's by dit_keys (the conversion the parity
    tests check): the refiner's separate to_q/to_k/to_v, each its own pair, land in their rows of Tencent's fused
    self_attn_qkv, and the final norm_out.linear's (scale, shift) in final_layer.adaLN_modulation.1's (shift, scale).
    A DiT stored in diffusers' layout takes a LoRA in Tencent's names (the compiler sees the fused refiner qkv as the
    runtime builds it)."""
    from telefuser.models.hunyuan15.dit_keys import diffusers_to_tencent, tencent_to_diffusers

    model, plain, _ = reference
    folder = _folder(tmp_path)
    g = torch.Generator().manual_seed(9)
    factors = {}  # diffusers module -> (A, B)
    for name, (a, b) in FACTORS.items():
        for new in _diffusers_name(name):
            if name.endswith("self_attn_qkv"):  # three modules of their own, each with its own A
                h = b.shape[0] // 3
                factors[new] = (torch.randn(RANK, a.shape[1], generator=g) / a.shape[1] ** 0.5,
                                torch.randn(h, RANK, generator=g) * 0.3 / (RANK * a.shape[1]) ** 0.5)
            else:
                factors[new] = (a, b)
    assert len(factors) == len(FACTORS) + 2
    _write(folder, "d.safetensors", {k: v.clone() for n, (a, b) in factors.items()
                                     for k, v in ((f"transformer.{n}.lora_A.weight", a),
                                                  (f"transformer.{n}.lora_B.weight", b))}, _peft_metadata())
    for merge, keep in ((True, True), (False, True), (False, False)):
        if not keep:  # nothing kept in the model dtype: the refiner's and the final linears run unmerged too
            monkeypatch.setattr(registry.get("HunyuanVideo15DiT").model_class, "KEEP_PRECISION_LINEARS", ())
        planned, lora_model = _dit(_recipe(folder, f"d{merge}{keep}.toml", [("d.safetensors", 0.6)], merge=merge))
        assert planned.loras[0].key_layout == "diffusers" and planned.loras[0].matched == len(factors)
        assert planned.loras[0].linears_covered == len(LINEARS)
        qkv = lora_model.txt_in.individual_token_refiner.blocks[0].self_attn_qkv
        if merge or keep:
            assert isinstance(qkv, nn.Linear)  # txt_in is kept in the model dtype: merged
        else:  # the three pairs stacked along the rank, each B in its own rows: block diagonal
            assert isinstance(qkv, LoraLinear) and qkv.down.shape == (3 * RANK, 64) and qkv.up.shape == (192, 3 * RANK)
            blocks = [[bool(qkv.up[64 * i:64 * (i + 1), RANK * j:RANK * (j + 1)].any()) for j in range(3)]
                      for i in range(3)]  # rows of q, k, v x the three pairs (in file order)
            assert all(sum(row) == 1 for row in blocks) and sorted(row.index(True) for row in blocks) == [0, 1, 2]
            assert isinstance(lora_model.final_layer.adaLN_modulation[1], LoraLinear)
        out = _run(lora_model)
        if merge:
            merged = tencent_to_diffusers({k: v.double() for k, v in BASE.items()})
            for name, (a, b) in factors.items():
                merged[name + ".weight"] += 0.6 * (ALPHA / RANK) * (b.double() @ a.double())
            model.load_state_dict({k: v.float() for k, v in diffusers_to_tencent(merged).items()})
            expected = _run(model)
            model.load_state_dict(BASE)
            assert _rel(expected, plain) > 0.02
        assert _rel(out, expected) < 1e-5
    # the DiT in diffusers' layout with the Tencent-named LoRA: the same output as with Tencent's file
    save_file(tencent_to_diffusers(BASE), str(folder / "dit_diffusers.safetensors"))
    _write(folder, LORA_FILE, _tencent(), _peft_metadata())
    recipe = _recipe(folder, "dd.toml", [(LORA_FILE, 1.0)])
    recipe.write_text(recipe.read_text().replace("tiny_hy15/hy15_dit.safetensors", "dit_diffusers.safetensors"))
    planned, lora_model = _dit(recipe)
    assert planned.key_layout == "diffusers" and planned.loras[0].matched == len(LINEARS)
    assert _rel(_run(lora_model), reference[2][1.0]) < 1e-5


def test_a_file_written_by_peft_itself_as_tencents_trainer_does(tmp_path, reference):
    """train.py's sequence with PEFT itself (skipped where PEFT is not installed): LoraConfig(r, lora_alpha,
    target_modules="all-linear", bias="none") injected into the DiT (Tencent's module names), random factors, the
    file as the transformer's save_lora_adapter writes it (get_peft_model_state_dict, the config's to_dict() as JSON
    under lora_adapter_metadata); then the PEFT-wrapped DiT's own output is the reference."""
    peft = pytest.importorskip("peft")
    folder = _folder(tmp_path)
    _, model = _dit(folder / "tiny_hy15.toml")  # a DiT of its own: PEFT wraps its linears in place
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0, bias="none",
                             task_type="FEATURE_EXTRACTION")
    wrapped = peft.inject_adapter_in_model(config, model, adapter_name="default")
    g = torch.Generator().manual_seed(5)
    for name, module in wrapped.named_modules():
        if name.endswith((".lora_A.default", ".lora_B.default")):
            module.weight.data = torch.randn(module.weight.shape, generator=g) * 0.05
    state = peft.get_peft_model_state_dict(wrapped, adapter_name="default")
    assert {k.rsplit(".lora_", 1)[0] for k in state} == set(LINEARS)  # "all-linear": every nn.Linear, by name
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in wrapped.peft_config["default"].to_dict().items()}
    _write(folder, LORA_FILE, {k: v.contiguous() for k, v in state.items()},
           {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True)})
    with torch.no_grad():
        expected = wrapped(**tiny_dit_inputs())
    assert _rel(expected, reference[1]) > 0.02
    for merge in (True, False):
        _, ours = _dit(_recipe(folder, f"p{merge}.toml", [(LORA_FILE, 1.0)], merge=merge))
        assert _rel(_run(ours), expected) < 1e-5  # float32 both, the same products in another order


@pytest.mark.parametrize("quant,bound", [("int8", 0.02), ("fp8_e4m3fn_rowwise", 0.08)])
def test_unmerged_lora_beside_quantised_linears(tmp_path, quant, bound):
    """quant_config with an unmerged LoRA (compiled for an H100, built on this CPU by the runtime's loader, as
    tests/test_encoder_streaming.py does): the blocks' linears are int8 / FP8 with the LoRA beside them in bfloat16,
    against the bfloat16 DiT with the LoRA merged. Bound: the quantisation's own (test_encoder_streaming: 0.02 int8,
    0.08 float8), the LoRA adding no error of its own beyond bfloat16 rounding. Measured 0.006 (int8), 0.019 (per-row
    float8); the LoRA's own effect on this output is 0.09."""
    from telefuser.ops.quantized_linear import LinearFP8, LinearInt8

    folder = _folder(tmp_path)
    _write(folder, LORA_FILE, _tencent(), _peft_metadata())
    cuda = ["target.device=cuda", "target.gpu=H100", "layer1.torch_dtype=bfloat16"]
    outputs = {}
    for name, merge, q in (("float", True, "none"), ("quant", False, quant)):
        plan = compile_recipe(_recipe(folder, f"{name}.toml", [(LORA_FILE, 1.0)], merge=merge),
                              [*cuda, f"layer2.models.dit.quant_config.quant_type={q}"])
        dit = build_model(plan.model("dit"), plan.layer2_inference_config.models["dit"], torch.device("cpu"))
        with torch.inference_mode():
            outputs[name] = dit(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                   for k, v in tiny_dit_inputs().items()}).float()
    q_attn = dit.double_blocks[0].img_attn_q
    assert isinstance(q_attn, LoraLinear) and isinstance(q_attn.base, LinearInt8 if quant == "int8" else LinearFP8)
    assert isinstance(dit.final_layer.linear, nn.Linear)  # kept in the model dtype: merged, not quantised
    assert 0 < _rel(outputs["quant"], outputs["float"]) < bound
