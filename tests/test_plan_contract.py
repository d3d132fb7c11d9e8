"""A plan that compiles is a plan the runtime runs.

A generated matrix of layer-2 switches and parallel degrees over every shipped tiny recipe: each combination is
compiled, and each plan the compiler accepts must load (one rank: `Pipeline` construction, every model built and
placed; several ranks: every check short of joining the ranks, and a sample loaded on real gloo ranks). A
refusal must come from the compiler (a RecipeError / TeleFuserError at compile time), never from loading.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest
import torch

from telefuser.compiler import compile_recipe
from telefuser.errors import RecipeError, TeleFuserError
from telefuser.runtime.pipeline import Pipeline, check_before_load
from telefuser.schema.canonical import pretty_json
from telefuser.schema.enums import BLOCK_MODES, is_dit

from gloo_ranks import spawn

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY_RECIPES = sorted(RECIPES.glob("tiny*.toml"))

# Per-model switches (applied to one model of the recipe, by name): every value the schema takes where the choice
# changes what the runtime does on a CPU target.
MODEL_SWITCHES = {
    "model_offload": ["offload_config.offload_type=MODEL_CPU_OFFLOAD"],
    "model_offload_no_prefetch": ["offload_config.offload_type=MODEL_CPU_OFFLOAD", "offload_config.prefetch_size=0"],
    "sequential": ["offload_config.offload_type=SEQUENTIAL_CPU_OFFLOAD"],
    "async": ["offload_config.offload_type=ASYNC_CPU_OFFLOAD", "offload_config.offload_ratio=0.5"],
    "async_no_prefetch": ["offload_config.offload_type=ASYNC_CPU_OFFLOAD", "offload_config.prefetch_size=0"],
    # one block per group, two copied ahead: the ring wraps on every streamable model (DiTs and text encoders)
    "async_group1": ["offload_config.offload_type=ASYNC_CPU_OFFLOAD", "offload_config.blocks_per_group=1",
                     "offload_config.prefetch_size=2"],
    "unpinned": ["offload_config.offload_type=MODEL_CPU_OFFLOAD", "offload_config.pin_cpu_memory=false"],
    "run_on_cpu": ["run_on_cpu=true"],
    "compile": ["compile_config.enabled=true", "compile_config.backend=eager"],
    "compile_fullgraph": ["compile_config.enabled=true", "compile_config.backend=eager", "compile_config.fullgraph=true"],
    "quant": ["quant_config.quant_type=fp8_e4m3fn"],
    "bf16": ["torch_dtype=bfloat16"],
    "feature_cache": ["feature_cache_config.method=teacache", "feature_cache_config.threshold=0.1"],
    "teacache": ["feature_cache_config.method=teacache", "feature_cache_config.threshold=0.1",
                 "feature_cache_config.coefficients=[1.0, 0.0]"],
    "first_block_cache": ["feature_cache_config.method=first_block", "feature_cache_config.threshold=0.05",
                          "feature_cache_config.max_consecutive_skips=1"],
    "static_cache": ["feature_cache_config.method=static", "feature_cache_config.compute_steps=[0, 2]",
                     "feature_cache_config.warmup_steps=1"],
    "taylorseer": ["feature_cache_config.method=taylorseer", "feature_cache_config.order=2"],
    "sparse": ["attention_config.sparse_config.dense_timesteps=1"],
    "radial": ["attention_config.attn_impl=RADIAL_ATTN", "attention_config.sparse_config.block_size=16",
               "attention_config.sparse_config.dense_layers=1"],
    "local": ["attention_config.attn_impl=LOCAL_SPARSE_ATTN", "attention_config.sparse_config.local_window_size=2"],
    "sage": ["attention_config.attn_impl=SAGE_ATTN_2_8_16"],
    "sage_radial": ["attention_config.attn_impl=SAGE_ATTN_2_8_8", "attention_config.sparse_config.sparse_impl=radial",
                    "attention_config.sparse_config.block_size=32", "attention_config.sparse_config.dense_layers=1"],
}
GLOBAL_SWITCHES = {
    "tiled": ["layer2.tiled=true", "layer2.tile_size=[16, 16]"],
    "vae_parallel": ["layer2.enable_vae_parallel=true"],
    "vfi": ["layer2.enable_vfi=true"],  # runs in tiny_vfi (its RIFE model); refused where no model has role vfi
    "vfi4": ["layer2.vfi_multiplier=4", "layer2.vfi_batch_size=3"],
    "sr": ["layer2.enable_sr=true"],
    "lq_noise": ["layer2.lq_noise_strength=0.5"],
}
LAYOUTS = {  # world size, parallel_config degrees
    "one": (1, []),
    "cfg2": (2, ["cfg_degree=2"]),
    "ulysses2": (2, ["sp_ulysses_degree=2"]),
    "ring2": (2, ["sp_ring_degree=2"]),
    "tp2": (2, ["tp_degree=2"]),
    "dp2": (2, ["dp_degree=2"]),
    "pp2": (2, ["pp_degree=2"]),
    "cfg2_fsdp": (2, ["cfg_degree=2", "enable_fsdp=true"]),
    "dp2_fsdp": (2, ["dp_degree=2", "enable_fsdp=true"]),
    "tp2_fsdp": (2, ["tp_degree=2", "enable_fsdp=true"]),
    "cfg2_tp2": (4, ["cfg_degree=2", "tp_degree=2"]),
    "cfg2_ulysses2": (4, ["cfg_degree=2", "sp_ulysses_degree=2"]),
}
# Two-rank plans loaded on real gloo ranks (the rest of the matrix gets every check short of joining ranks): every
# two-rank layout once, each with a switch that changes where a model lives.
GLOO_SAMPLE = ("cfg2+dit.model_offload", "ulysses2+dit.async", "ring2+dit.compile", "tp2+text_encoder.run_on_cpu",
               "dp2+vae_parallel", "cfg2_fsdp+text_encoder.bf16", "cfg2+tiled", "ulysses2+text_encoder.model_offload",
               "cfg2+text_encoder.async")
# HunyuanVideo-1.5's multi-rank plans (its own parallel hooks, broadcasts and VAE): one gloo load per layout it runs.
GLOO_SAMPLE_HY15 = ("ulysses2+dit.model_offload", "ring2+vae_parallel", "dp2+text_encoder.run_on_cpu",
                    "cfg2+tiled", "cfg2_fsdp+text_encoder.bf16", "tp2+text_encoder.run_on_cpu",
                    "ulysses2+dit.compile", "cfg2+dit.first_block_cache")  # the blocks compiled / cached under sp, cfg
GLOO_SAMPLES = {"tiny": GLOO_SAMPLE, "tiny_hy15": GLOO_SAMPLE_HY15, "tiny_hy15_i2v": ("ulysses2+vae_parallel",)}
SAMPLED_COMBINATIONS = 40  # per recipe: random sets of 2-3 switches on one rank, beyond every single switch


def _model_names(recipe: Path) -> list[str]:
    from telefuser.compiler.recipe_loader import load_recipe

    return [m.name for m in load_recipe(recipe).recipe.layer1.models if m.role != "tokenizer"]


def _switch_overrides(recipe: Path) -> dict[str, list[str]]:
    out = {f"{model}.{name}": [f"layer2.models.{model}.{o}" for o in values]
           for model in _model_names(recipe) for name, values in MODEL_SWITCHES.items()}
    out.update(GLOBAL_SWITCHES)
    return out


def _layout_overrides(layout: str) -> list[str]:
    world, degrees = LAYOUTS[layout]
    return [f"target.num_devices={world}", *(f"layer2.parallel_config.{d}" for d in degrees)]


def _matrix(recipe: Path) -> list[tuple[str, list[str]]]:
    """(label, overrides): every switch alone on every layout, and sampled sets of switches on one rank."""
    switches = _switch_overrides(recipe)
    cases = [(f"{layout}+none", _layout_overrides(layout)) for layout in LAYOUTS]
    for layout, (name, overrides) in itertools.product(LAYOUTS, switches.items()):
        if layout != "one" and not name.startswith(("dit", "text_encoder", "vae_parallel", "tiled")):
            continue  # on several ranks: the switches whose placement the mesh changes
        cases.append((f"{layout}+{name}", [*_layout_overrides(layout), *overrides]))
    rng = random.Random(f"plan-contract-{recipe.stem}")
    names = sorted(switches)
    for _ in range(SAMPLED_COMBINATIONS):
        chosen = rng.sample(names, rng.choice((2, 3)))  # two of one model's keys: the later value stands
        cases.append((f"one+{'+'.join(chosen)}", [o for c in chosen for o in switches[c]]))
    return cases


def _compiles(recipe: Path, overrides: list[str]):
    try:
        return compile_recipe(recipe, overrides)
    except TeleFuserError as exc:
        assert exc.exit_code == 2
        message = " ".join(str(exc).split())
        assert len(message) > 40, message  # a paragraph: what, where, how to fix
        return None


def _check_placement(plan) -> None:
    """The plan's placement is complete and consistent with its own memory records."""
    assert [p.model for p in plan.placement] == [m.name for m in plan.layer1_model_definition.models]
    for model, placement in zip(plan.layer1_model_definition.models, plan.placement):
        blocks = plan.memory.block_plan(model.name)
        assert (placement.offload_type in BLOCK_MODES) == (blocks is not None) == (placement.streamed_blocks > 0)
        assert placement.parallelized == (is_dit(model.role) and plan.mesh.world_size > 1)
        if placement.sharded:
            assert plan.mesh.world_size > 1 and placement.ranks == "all"


@pytest.mark.parametrize("recipe", TINY_RECIPES, ids=lambda p: p.stem)
def test_every_plan_the_compiler_accepts_loads(recipe, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    accepted, refused, multi_rank = 0, 0, []
    for label, overrides in _matrix(recipe):
        plan = _compiles(recipe, overrides)
        if plan is None:
            refused += 1
            continue
        accepted += 1
        _check_placement(plan)
        check_before_load(plan)
        if plan.mesh.world_size == 1:
            try:
                Pipeline(plan)
            except TeleFuserError as exc:  # pragma: no cover - the failure this test exists for
                pytest.fail(f"{recipe.name} [{label}] compiled but did not load: {exc}")
        elif plan.mesh.world_size == 2:
            multi_rank.append((label, plan))
    assert accepted and refused  # the matrix reaches both sides of the line
    sample = GLOO_SAMPLES.get(recipe.stem)
    if sample:  # a sample of two-rank plans, each loaded on two real gloo ranks (one spawn)
        chosen = [plan for label, plan in multi_rank if label in sample]
        assert len(chosen) == len(sample)
        paths = []
        for i, plan in enumerate(chosen):
            path = tmp_path / f"plan{i}.json"
            path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
            paths.append(str(path))
        monkeypatch.setenv("TELEFUSER_TEST_PLANS", os.pathsep.join(paths))
        spawn(_load_on_each_rank, 2, monkeypatch)


def _load_on_each_rank() -> None:
    import torch.distributed as dist

    import telefuser

    os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()))
    for path in os.environ["TELEFUSER_TEST_PLANS"].split(os.pathsep):
        pipe = telefuser.load_plan(path)
        assert pipe.placements, path
        dist.barrier()


@pytest.mark.parametrize("overrides, key", [
    (["layer2.enable_sr=true"], "layer2.enable_sr"),
    (["layer2.lq_noise_strength=0.3"], "layer2.lq_noise_strength"),
    (["target.num_devices=2", "layer2.parallel_config.pp_degree=2"], "layer2.parallel_config.pp_degree"),
])
def test_features_the_runtime_lacks_are_refused_at_compile_time(overrides, key):
    with pytest.raises(RecipeError) as info:
        compile_recipe(RECIPES / "tiny.toml", overrides)
    message = str(info.value)
    assert key in message and "not executable yet" in message


@pytest.mark.parametrize("overrides, needle", [
    (["layer2.models.dit.offload_config.offload_type=MODEL_CPU_OFFLOAD"], "tensor-parallel weights stay"),
    (["layer2.models.dit.compile_config.enabled=true"], "compile_config.enabled = true with"),
    (["layer2.parallel_config.tp_degree=1", "layer2.parallel_config.cfg_degree=2",
      "layer2.parallel_config.enable_fsdp=true", "layer2.models.vae.offload_config.offload_type=MODEL_CPU_OFFLOAD"],
     "FSDP owns where the shards live"),
    (["layer2.parallel_config.enable_fsdp=true"], "enable_fsdp with tp_degree > 1"),
    (["layer2.parallel_config.tp_degree=1", "layer2.parallel_config.dp_degree=2",
      "layer2.parallel_config.enable_fsdp=true"], "enable_fsdp with dp_degree > 1"),
])
def test_settings_that_do_not_compose_are_refused_at_compile_time(overrides, needle):
    with pytest.raises(RecipeError) as info:
        compile_recipe(RECIPES / "tiny.toml", ["target.num_devices=2", "layer2.parallel_config.tp_degree=2", *overrides])
    assert needle in " ".join(str(info.value).split())
