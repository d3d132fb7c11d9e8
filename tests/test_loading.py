"""Loading a plan's models: the checkpoint's tensors exactly, built on meta (nothing initialised at random),
and the GPU reader (pinned staging buffers) giving the file's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from telefuser.compiler import compile_recipe
from telefuser.models import registry
from telefuser.runtime.load import weights
from telefuser.runtime.load.build import build_model
from telefuser.schema.model_config import ModelRuntimeConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "orthogonal_")


@pytest.fixture(scope="module")
def plan():
    return compile_recipe(RECIPES / "tiny.toml")


def _file_state(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def init_spy(monkeypatch):
    """Every call of a random torch.nn.init function on a tensor that is not on the meta device."""
    calls: list[str] = []
    for name in RANDOM_INITS:
        original = getattr(torch.nn.init, name)

        def spy(tensor, *args, _name=name, _original=original, **kwargs):
            if not tensor.is_meta:
                calls.append(f"{_name}{tuple(tensor.shape)}")
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    return calls


def test_loaded_models_hold_the_files_tensors_and_nothing_random(plan, init_spy):
    for planned in plan.layer1_model_definition.models:
        if planned.role == "tokenizer":
            continue
        model = build_model(planned, ModelRuntimeConfig(), torch.device("cpu"))
        entry = registry.get(planned.class_)
        expected = entry.convert(_file_state(planned.files[0].path), planned.key_layout)
        state = model.state_dict()
        assert state.keys() == expected.keys(), planned.name
        for key, value in expected.items():
            assert torch.equal(state[key], value.to(state[key].dtype)), f"{planned.name}.{key}"
        assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers())), planned.name
    assert init_spy == [], f"parameters initialised at random while loading: {init_spy[:5]}"


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("tiny*.toml")), ids=lambda p: p.stem)
def test_no_model_is_initialised_at_random_while_any_tiny_plan_loads(recipe, init_spy):
    import telefuser
    from telefuser.runtime.pipeline import Pipeline

    pipe = Pipeline(compile_recipe(recipe))
    assert pipe.placements and isinstance(pipe, telefuser.Pipeline)
    assert init_spy == [], f"{recipe.name}: initialised at random while loading: {init_spy[:5]}"


@pytest.mark.parametrize("wan22", [False, True], ids=["WanVAE", "Wan22VAE"])
def test_either_vae_is_built_on_meta_with_its_latent_statistics(wan22):
    from telefuser.models.wan import vae, vae22

    module, cls, config = (vae22, vae22.Wan22VAE, vae22.Wan22VAEConfig) if wan22 else (vae, vae.WanVAE, vae.WanVAEConfig)
    with torch.device("meta"):
        built = cls(config())
    assert all(p.is_meta for p in built.parameters())
    assert built.latent_stats.device.type == "cpu"
    assert torch.equal(built.latent_stats.flatten(), torch.tensor([module.LATENT_MEAN, module.LATENT_STD]).flatten())


def test_vae_is_built_on_meta_with_its_latent_statistics(plan):
    from telefuser.models.wan.vae import LATENT_MEAN, LATENT_STD, WanVAE, WanVAEConfig
    from telefuser.runtime.load.build import _instantiate

    with torch.device("meta"):
        vae = WanVAE(WanVAEConfig())
    assert all(p.is_meta for p in vae.parameters())
    assert torch.equal(vae.latent_stats.flatten(), torch.tensor([LATENT_MEAN, LATENT_STD]).flatten())
    planned = next(m for m in plan.layer1_model_definition.models if m.role == "vae")
    built = _instantiate(registry.get(planned.class_), planned)
    assert all(p.is_meta for p in built.parameters()), "the VAE was built for real"
    # Built for real elsewhere (as benchmarks do), the buffer follows the default device.
    with torch.device("cpu"):
        assert WanVAE(WanVAEConfig(z_dim=4, base_dim=4)).latent_stats.device.type == "cpu"


def _mixed_file(path: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(300, 7, generator=gen).to(torch.bfloat16),  # 4200 bytes: several runs
        "a.weight": torch.randn(5, 3, generator=gen),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
        "ids": torch.arange(11, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "fp8": torch.randn(9, generator=gen).to(torch.float8_e4m3fn),
    }
    save_file(tensors, path)
    return tensors


def test_runs_cover_the_file_bytes_in_consecutive_chunks(tmp_path, monkeypatch):
    """The GPU reader's grouping, replayed on the CPU: each run filled from the file, pieces copied out."""
    monkeypatch.setattr(weights, "STAGE_BYTES", 1000)
    path = tmp_path / "m.safetensors"
    tensors = _mixed_file(path)
    header, data_start = weights._safetensors_layout(path)
    raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    out, pieces = {}, []
    for name, info in header.items():
        t = torch.empty(info["shape"], dtype=weights._ST_DTYPES[info["dtype"]])
        out[name] = t
        begin, end = info["data_offsets"]
        if end > begin:
            pieces.append((weights._as_bytes(t), data_start + begin, end - begin))
    runs = weights._runs(pieces)
    assert all(count <= 1000 for _, count, _ in runs) and len(runs) >= 5
    for start, count, members in runs:
        buffer = raw[start:start + count].clone()
        assert sum(n for _, _, n in members) == count
        for dst, offset, n in members:
            dst.copy_(buffer[offset:offset + n])
    for name, value in tensors.items():
        assert out[name].dtype == value.dtype and torch.equal(weights._as_bytes(out[name]), weights._as_bytes(value))


def test_damaged_file_is_refused_before_any_read(tmp_path):
    from telefuser.errors import WeightsError

    path = tmp_path / "m.safetensors"
    _mixed_file(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(WeightsError, match="truncated, damaged or unreadable"):
        weights.read_state_dict([path], "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_reader_gives_the_files_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "STAGE_BYTES", 1000)
    path = tmp_path / "m.safetensors"
    tensors = _mixed_file(path)
    state = weights.read_state_dict([path], "cuda")
    for name, value in tensors.items():
        assert state[name].is_cuda and state[name].dtype == value.dtype
        assert torch.equal(weights._as_bytes(state[name].cpu()), weights._as_bytes(value)), name
    cast = weights.read_state_dict([path], "cuda", torch.bfloat16)
    assert cast["a.weight"].dtype == torch.bfloat16 and cast["ids"].dtype == torch.int64
    assert cast["fp8"].dtype == torch.float8_e4m3fn
    torch.save({k: v for k, v in tensors.items() if k != "fp8"}, tmp_path / "m.pth")
    pickled = weights.read_state_dict([tmp_path / "m.pth"], "cuda")
    for name, value in pickled.items():
        assert value.is_cuda and torch.equal(weights._as_bytes(value.cpu()), weights._as_bytes(tensors[name])), name


def test_load_plan_records_its_phases(tmp_path):
    import time

    import telefuser
    from telefuser.schema.canonical import pretty_json

    path = tmp_path / "tiny.plan.json"
    path.write_text(pretty_json(compile_recipe(RECIPES / "tiny.toml").model_dump(mode="json", by_alias=True)))
    start = time.perf_counter()
    pipe = telefuser.load_plan(str(path))
    wall = time.perf_counter() - start
    names = [name for name, _ in pipe.load_phases.rows]
    assert names[:3] == ["read plan", "check plan", "join ranks"] and names[-1] == "warm up"
    for model in ("dit", "vae", "text_encoder"):
        assert names.index(f"{model}: read") < names.index(f"{model}: build") < names.index(f"{model}: place")
    assert "tokenizer: read" in names
    assert 0 < pipe.load_phases.total <= wall


def test_a_derived_buffer_left_on_meta_is_refused_not_hidden_by_a_real_build():
    from types import SimpleNamespace

    from telefuser.runtime.load.build import _instantiate

    class Leaky(torch.nn.Module):
        def __init__(self, config) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("derived", torch.ones(2), persistent=False)  # follows the default device: meta

    entry = SimpleNamespace(model_class=Leaky, config_class=lambda **arch: None)
    with pytest.raises(RuntimeError, match=r"leaves its derived buffer\(s\) \['derived'\]"):
        _instantiate(entry, SimpleNamespace(arch={}, class_="Leaky", name="m"))
