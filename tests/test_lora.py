"""LoRA in the published layouts: merged against a hand-computed W + s * alpha/rank * up @ down, several LoRAs,
unmerged equal to merged, unmerged on an FP8 checkpoint (weights stay FP8), mismatch refused or warned with the
counts, bad files, and the embedded FP8 + LoRA recipe end to end."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch
from safetensors.torch import load_file, save_file

from compiler_fixtures import REPO, TINY, model_set, write_recipe
from telefuser.cli.compile import main as compile_main
from telefuser.cli.run import main as run_main
from telefuser.compiler import compile_recipe
from telefuser.errors import WeightsError
from telefuser.models.tiny import fp8_checkpoint
from telefuser.models.wan import dit_keys
from telefuser.ops.lora_linear import LoraLinear
from telefuser.ops.quantized_linear import LinearFP8
from telefuser.runtime.load.build import build_model
from telefuser.schema.model_config import ModelRuntimeConfig

BASE = load_file(TINY / "dit.safetensors")
LORA = load_file(TINY / "lora_distill.safetensors")  # lightx2v's layout: diffusion_model., alpha, diff/diff_b/diff_m
RANK, ALPHA = 4, 2.0


def _peft(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same low-rank pairs in diffusers/PEFT names (transformer.blocks.N.attn1.to_q.lora_A/B; alpha folded
    into lora_A as diffusers does, since PEFT files carry no alpha)."""
    out = {}
    for key, value in kohya.items():
        module = key.removeprefix("diffusion_model.").rsplit(".", 2)[0]
        new = next(iter(dit_keys.wan_to_diffusers({module + ".weight": None}))).removesuffix(".weight")
        if key.endswith("lora_down.weight"):
            out[f"transformer.{new}.lora_A.weight"] = value * (ALPHA / RANK)
        elif key.endswith("lora_up.weight"):
            out[f"transformer.{new}.lora_B.weight"] = value
    return out


def _flattened(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """musubi-tuner's names: lora_unet_blocks_0_self_attn_q.lora_down.weight."""
    out = {}
    for key, value in kohya.items():
        if key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")):
            module, _, leaf = key.removeprefix("diffusion_model.").partition(".lora_")
            if leaf:
                out[f"lora_unet_{module.replace('.', '_')}.lora_{leaf}"] = value
            else:
                module = key.removeprefix("diffusion_model.").removesuffix(".alpha")
                out[f"lora_unet_{module.replace('.', '_')}.alpha"] = value
    return out


def _expected(strengths: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Hand-computed merged weights: W + s * alpha/rank * up @ down, and W + s * diff for differences."""
    want = {k: v.clone() for k, v in BASE.items()}
    for lora, strength in strengths:
        for key, value in lora.items():
            stem = key.removeprefix("diffusion_model.")
            if stem.endswith(".lora_down.weight"):
                module = stem.removesuffix(".lora_down.weight")
                up = lora[f"diffusion_model.{module}.lora_up.weight"]
                alpha = float(lora[f"diffusion_model.{module}.alpha"])
                want[module + ".weight"] += strength * alpha / value.shape[0] * (up @ value)
            for suffix, param in ((".diff_b", ".bias"), (".diff_m", ".modulation"), (".diff", ".weight")):
                if stem.endswith(suffix):
                    want[stem.removesuffix(suffix) + param] += strength * value
    return want


def _folder(tmp_path: Path, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    folder = model_set(tmp_path)
    for name, state in files.items():
        save_file(state, folder / name)
    return folder


def _lora_toml(*loras: tuple[str, float], merge: bool = True, on_mismatch: str = "error") -> str:
    return "\n".join(f"[[layer2.models.dit.lora_configs]]\npath = \"{p}\"\nstrength = {s}\nmerge = "
                     f"{str(merge).lower()}\non_mismatch = \"{on_mismatch}\"" for p, s in loras)


def _build(folder: Path, layer2_extra: str, name: str = "r.toml", dit: str | None = None):
    recipe = write_recipe(folder, layer2_extra=layer2_extra, name=name)
    if dit:
        recipe.write_text(recipe.read_text().replace('path = "dit.safetensors"', f'path = "{dit}"'))
    plan = compile_recipe(recipe)
    runtime = plan.layer2_inference_config.models.get("dit", ModelRuntimeConfig())
    return plan.model("dit"), build_model(plan.model("dit"), runtime, torch.device("cpu"))


def _inputs():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([600.0]), torch.randn(1, 6, 32, generator=g))


@pytest.mark.parametrize("layout", ["kohya", "peft", "flattened"])
def test_merged_lora_equals_the_hand_computed_update(tmp_path, layout):
    if layout == "kohya":
        lora, pairs_only = LORA, False
    else:
        pairs = {k: v for k, v in LORA.items() if k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))}
        lora, pairs_only = (_peft(pairs) if layout == "peft" else _flattened(pairs)), True
    folder = _folder(tmp_path, {"l.safetensors": lora})
    planned, model = _build(folder, _lora_toml(("l.safetensors", 0.7)))
    (recorded,) = planned.loras
    assert recorded.key_layout == {"kohya": "wan", "peft": "diffusers", "flattened": "kohya"}[layout]
    assert recorded.matched == recorded.modules == (20 if pairs_only else 51) and recorded.linears_covered == 20
    reference = _expected([({k: v for k, v in LORA.items() if not pairs_only or "lora_" in k or k.endswith("alpha")},
                            0.7)])
    state = model.state_dict()
    for key, value in reference.items():
        # float32: the update is computed in float32 and added once (one rounding of W + delta)
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=1e-6, msg=key)
    changed = [k for k in reference if not torch.equal(reference[k], BASE[k])]
    assert len(changed) == (20 if pairs_only else 20 + 20 + 2 * 4 + 1 + 2)  # weights, biases, norms, head, mods


def test_several_loras_with_strengths_and_unmerged_equals_merged(tmp_path):
    second = {k: 0.5 * v if "lora_up" in k else v for k, v in LORA.items() if "lora_" in k or k.endswith("alpha")}
    folder = _folder(tmp_path, {"a.safetensors": LORA, "b.safetensors": second})
    loras = (("a.safetensors", 1.0), ("b.safetensors", -0.6))
    _, merged = _build(folder, _lora_toml(*loras), "m.toml")
    reference = _expected([(LORA, 1.0), (second, -0.6)])
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, reference[key], atol=2e-6, rtol=1e-6, msg=key)
    planned, unmerged = _build(folder, _lora_toml(*loras, merge=False), "u.toml")
    # the memory estimate keeps the unmerged LoRAs resident beside the float32 weights (their files' size)
    sizes = sum((folder / name).stat().st_size for name, _ in loras)
    assert compile_recipe(folder / "u.toml").memory.breakdown["weights.dit"] == planned.parameter_count * 4 + sizes
    wrapped = [n for n, m in unmerged.named_modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 20 and torch.equal(unmerged.blocks[0].self_attn.q.base.weight, BASE["blocks.0.self_attn.q.weight"])
    assert unmerged.blocks[0].self_attn.q.down.shape == (2 * RANK, 64)  # the two LoRAs stacked along the rank
    with torch.no_grad():
        a, b = merged(*_inputs()), unmerged(*_inputs())
    # Same sums in float32, different order ((W + s up down) x vs W x + s up (down x)): a few float32 ulps per
    # layer, ~1e-6 relative through the two blocks.
    assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_unmerged_lora_on_an_fp8_checkpoint_keeps_the_weights_fp8(tmp_path):
    fp8 = fp8_checkpoint(BASE, "weight_scale", per_channel=True, marker=False)
    folder = _folder(tmp_path, {"fp8.safetensors": fp8, "l.safetensors": LORA})
    with pytest.raises(WeightsError, match=r"stored in float8, so merging LoRA .* set .*lora_configs\[0\]\.merge = false"):
        _build(folder, _lora_toml(("l.safetensors", 1.0)), "m.toml", dit="fp8.safetensors")
    _, model = _build(folder, _lora_toml(("l.safetensors", 1.0), merge=False), "u.toml", dit="fp8.safetensors")
    q = model.blocks[1].cross_attn.q
    assert isinstance(q, LoraLinear) and isinstance(q.base, LinearFP8)
    assert torch.equal(q.base.weight.view(torch.uint8), fp8["blocks.1.cross_attn.q.weight"].view(torch.uint8))
    # Reference: the dequantised FP8 weights in float32 with the LoRA merged (float32 math throughout).
    dequantised = {k: (v.float() * fp8[k[:-len("weight")] + "weight_scale"].reshape(-1, 1))
                   if v.dtype == torch.float8_e4m3fn else v for k, v in fp8.items() if not k.endswith("weight_scale")}
    ref_folder = _folder(tmp_path / "ref", {"deq.safetensors": dequantised, "l.safetensors": LORA})
    _, reference = _build(ref_folder, _lora_toml(("l.safetensors", 1.0)), dit="deq.safetensors")
    with torch.no_grad():
        out, expected = model(*_inputs()), reference(*_inputs())
    # Only the base linears' activations are rounded to e4m3 (see test_fp8_checkpoint: within 5%); the LoRA
    # branch runs in float32.
    rel = ((out - expected).norm() / expected.norm()).item()
    assert 1e-4 < rel < 0.05, rel


def test_mismatch_refused_or_warned_with_counts(tmp_path):
    extra = {"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.ones(4, 64),
             "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.ones(64, 4),
             "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.ones(4, 5120),
             "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.ones(128, 4)}
    partial = {**{k: v for k, v in LORA.items() if "blocks.0.ffn.0" not in k}, **extra}
    folder = _folder(tmp_path, {"p.safetensors": partial, "none.safetensors": dict(list(extra.items())[:2])})
    with pytest.raises(WeightsError) as err:
        _build(folder, _lora_toml(("p.safetensors", 1.0)), "e.toml")
    message = " ".join(str(err.value).split())
    assert "matched 49 of 51 LoRA modules" in message and "blocks.7.self_attn.q: no such weight" in message
    assert "blocks.0.ffn.0: LoRA shape [128, 5120], model [128, 64]" in message and 'on_mismatch = "warn"' in message
    with pytest.warns(UserWarning, match="matched 49 of 51 LoRA modules.*Only the 49 that match are applied"):
        planned, model = _build(folder, _lora_toml(("p.safetensors", 1.0), on_mismatch="warn"), "w.toml")
    assert (planned.loras[0].matched, planned.loras[0].modules) == (49, 51)
    assert torch.equal(model.blocks[0].ffn[0].weight, BASE["blocks.0.ffn.0.weight"])  # the mismatched one: untouched
    with pytest.raises(WeightsError, match="matched 0 of 1 LoRA modules"):
        _build(folder, _lora_toml(("none.safetensors", 1.0)), "n.toml")


def _cli_case(tmp_path: Path, damage) -> tuple[Path, Path]:
    folder = _folder(tmp_path, {"l.safetensors": LORA})
    recipe = write_recipe(folder, layer2_extra=_lora_toml(("l.safetensors", 1.0)))
    damage(folder / "l.safetensors")
    return recipe, tmp_path / "plan.json"


@pytest.mark.parametrize("damage,needle", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "is truncated"),
    (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "), "not a readable safetensors file"),
    (lambda p: save_file({"blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 64)}, p), "needs both its down (A)"),
    (lambda p: save_file({"blocks.0.self_attn.q.weight": torch.ones(64, 64)}, p), "which is no LoRA tensor name"),
])
def test_bad_lora_file_exits_2_without_a_plan(tmp_path, capsys, damage, needle):
    recipe, out = _cli_case(tmp_path, damage)
    assert compile_main([str(recipe), "-o", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and needle in err and "lora_configs[0]" in err
    assert not out.exists()


def test_embedded_fp8_lora_recipe_end_to_end_and_a_changed_lora_refused(tmp_path, capsys):
    """recipes/tiny_fp8_lora.toml: compile + run + mp4 through the CLI; then the LoRA changes and the run refuses.
    (Two steps of five frames: PyTorch's CPU float8 matmul is a reference kernel, ~0.1 s per tiny linear.)"""
    shutil.copytree(REPO / "recipes" / "tiny", tmp_path / "tiny")
    for name in ("tiny.toml", "tiny_fp8_lora.toml"):
        shutil.copy(REPO / "recipes" / name, tmp_path / name)
    plan, video = tmp_path / "plan.json", tmp_path / "fox.mp4"
    assert compile_main([str(tmp_path / "tiny_fp8_lora.toml"), "-o", str(plan), "--set", "layer2.num_inference_steps=2",
                         "--set", "layer2.num_frames=5"]) == 0
    assert run_main([str(plan), "--prompt", "a fox", "--seed", "1", "-o", str(video), "--no-progress"]) == 0
    reader = imageio_ffmpeg.read_frames(str(video))
    meta = next(reader)
    assert meta["size"] == (256, 144) and sum(1 for _ in reader) == 5
    lora = tmp_path / "tiny" / "lora_distill.safetensors"
    save_file({k: v * 2 if "lora_up" in k else v for k, v in load_file(lora).items()}, lora)  # same header, new bytes
    capsys.readouterr()
    compile_main([str(tmp_path / "tiny_fp8_lora.toml"), "-o", str(tmp_path / "p2.json"), "--hash-weights"])
    save_file({k: v * 3 if "lora_up" in k else v for k, v in load_file(lora).items()}, lora)
    out = tmp_path / "again.mp4"
    assert run_main([str(tmp_path / "p2.json"), "--prompt", "a fox", "-o", str(out), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and "lora_distill.safetensors" in err and "changed since the plan was compiled" in err
    assert not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped recipe's LoRA matches the model exactly: no warning
        compile_recipe(tmp_path / "tiny_fp8_lora.toml")
