"""Sparse attention and step caches as plan features (issue 25, the wiring): compiled from the recipe's keys into
the denoise stage's records, refused where they do not compose, run by the runtime on the tiny plans (one rank,
the Wan2.2 MoE pair, cfg 2 and Ulysses 2 on gloo ranks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.compiler import skip_work as compiler_skip_work
from telefuser.errors import RecipeError
from telefuser.schema import block_masks
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny.toml"
DIT = "layer2.models.dit"
PROMPT, SEED = "a red fox running through fresh snow", 3
RADIAL = [f"{DIT}.attention_config.attn_impl=RADIAL_ATTN", f"{DIT}.attention_config.sparse_config.block_size=16"]
# Radial Attention on the quantised kernel (its use_sage_attention): the kernel is the attn_impl, the pattern named
SAGE_RADIAL = [f"{DIT}.attention_config.attn_impl=SAGE_ATTN_2_8_16", f"{DIT}.attention_config.sparse_config.sparse_impl=radial",
               f"{DIT}.attention_config.sparse_config.block_size=32"]


def denoise_params(plan) -> dict:
    return next(s for s in plan.stages if s.kind == "denoise").params


def write(plan, path: Path) -> Path:
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return path


# ------------------------------------------------------------------ the compiler


def test_teacache_fits_are_the_runtime_table():
    """The compiler picks from the very table the runtime applies (schema/teacache_fits.py), not a copy."""
    from telefuser.runtime.caches import HY15_COEFFICIENTS, WAN21_COEFFICIENTS

    assert compiler_skip_work.WAN21_COEFFICIENTS is WAN21_COEFFICIENTS
    assert compiler_skip_work.HY15_COEFFICIENTS is HY15_COEFFICIENTS
    assert set(HY15_COEFFICIENTS) == {f"hunyuan_video15_{t}_{r}" for t in ("t2v", "i2v") for r in ("480p", "720p")}


def test_sparse_plan_records_pattern_and_density():
    plan = compile_recipe(TINY, [*RADIAL, f"{DIT}.attention_config.sparse_config.dense_layers=1"])
    record = denoise_params(plan)["sparse_attention"]["dit"]
    grid = (3, 9, 16)  # 144p 16:9, 9 frames: 3 latent frames of 18 x 32 latent pixels, 2x2 patches
    assert record["density_grid"] == list(grid) and record["sparse_impl"] == "radial" and record["dense_layers"] == 1
    assert record["density"] == round(block_masks.density(block_masks.radial_mask(grid, 16, 1.0)), 6) < 1
    entry = next(d for d in plan.dispatch if d.model == "dit" and d.op == "attention")
    assert entry.impl == "RADIAL_ATTN" and "density" in entry.reason
    local = compile_recipe(TINY, [f"{DIT}.attention_config.attn_impl=LOCAL_SPARSE_ATTN",
                                  f"{DIT}.attention_config.sparse_config.local_window_size=2",
                                  f"{DIT}.attention_config.sparse_config.block_size=16"])
    assert denoise_params(local)["sparse_attention"]["dit"]["density"] < 1
    assert "sparse_attention" not in denoise_params(compile_recipe(TINY))  # nothing recorded when unused
    # Ulysses composes (whole sequences per rank for its heads)
    compile_recipe(TINY, [*RADIAL, "target.num_devices=2", "layer2.parallel_config.sp_ulysses_degree=2"])


def test_quantised_sparse_plan_records_pattern_kernel_and_density():
    """A sparse_config beside SAGE_ATTN_*: the pattern runs through the quantised kernel's block-sparse mode."""
    from telefuser.compiler.explain import explain

    plan = compile_recipe(TINY, [*SAGE_RADIAL, f"{DIT}.attention_config.sparse_config.dense_layers=1"])
    record = denoise_params(plan)["sparse_attention"]["dit"]
    assert record["sparse_impl"] == "radial" and record["attn_impl"] == "SAGE_ATTN_2_8_16" and record["dense_layers"] == 1
    assert record["density"] == round(block_masks.density(block_masks.radial_mask((3, 9, 16), 32, 1.0)), 6)
    entry = next(d for d in plan.dispatch if d.model == "dit" and d.op == "attention")
    assert entry.impl == "SAGE_ATTN_2_8_16" and "block-sparse mode" in entry.reason
    assert "radial through SAGE_ATTN_2_8_16 (quantised, dense steps too)" in explain(plan)
    radial = denoise_params(compile_recipe(TINY, RADIAL))["sparse_attention"]["dit"]
    assert radial["attn_impl"] == "RADIAL_ATTN"


def test_reference_constructors_build_the_toml_plan(tmp_path):
    """`AttentionConfig.radial_attention(...)` / `local_sparse_attention(...)` in Python give the plan the TOML keys
    give (plan_hash included)."""
    from telefuser.compiler.recipe_loader import load_recipe
    from telefuser.core.config import AttentionConfig, ModelRuntimeConfig

    base = load_recipe(TINY).recipe
    for config, keys in [
        (AttentionConfig.radial_attention(dense_timesteps=2, dense_layers=1, decay_factor=0.5),
         ["attn_impl=RADIAL_ATTN", "sparse_config.sparse_impl=radial", "sparse_config.dense_timesteps=2",
          "sparse_config.dense_layers=1", "sparse_config.decay_factor=0.5"]),
        (AttentionConfig.local_sparse_attention(dense_timesteps=1, local_window_size=3),
         ["attn_impl=LOCAL_SPARSE_ATTN", "sparse_config.sparse_impl=local", "sparse_config.dense_timesteps=1",
          "sparse_config.local_window_size=3"]),
        (AttentionConfig.radial_attention(dense_timesteps=2, dense_layers=1, attn_impl="SAGE_ATTN_2_8_8"),
         ["attn_impl=SAGE_ATTN_2_8_8", "sparse_config.sparse_impl=radial", "sparse_config.dense_timesteps=2",
          "sparse_config.dense_layers=1"]),
        (AttentionConfig.local_sparse_attention(local_window_size=3, attn_impl="SAGE_ATTN_2_8_16"),
         ["attn_impl=SAGE_ATTN_2_8_16", "sparse_config.sparse_impl=local", "sparse_config.dense_timesteps=40",
          "sparse_config.local_window_size=3"]),
    ]:
        models = dict(base.layer2.models)
        models["dit"] = models.get("dit", ModelRuntimeConfig()).model_copy(update={"attention_config": config})
        recipe = base.model_copy(update={"layer2": base.layer2.model_copy(update={"models": models})})
        from_python = telefuser.compile(recipe, base_dir=TINY.parent)
        from_toml = compile_recipe(TINY, [f"{DIT}.attention_config.{k}" for k in keys])
        assert denoise_params(from_python) == denoise_params(from_toml)
        assert from_python.dispatch == from_toml.dispatch
        assert from_python.layer2_inference_config == from_toml.layer2_inference_config
        assert from_python.plan_hash == from_toml.plan_hash


@pytest.mark.parametrize("overrides, needle", [
    ([*RADIAL, "target.num_devices=2", "layer2.parallel_config.sp_ring_degree=2"], "sparse ring is not built"),
    ([f"{DIT}.attention_config.attn_impl=SAGE_ATTN_2_8_16", f"{DIT}.attention_config.sparse_config.dense_layers=1"],
     "the pattern must be named here"),
    ([*SAGE_RADIAL, f"{DIT}.attention_config.sparse_config.block_size=16"], "blocks of at least 32 tokens"),
    ([*SAGE_RADIAL, "target.num_devices=2", "layer2.parallel_config.sp_ring_degree=2"], "sparse ring is not built"),
    ([f"{DIT}.attention_config.attn_impl=SAGE_ATTN_2_8_8", f"{DIT}.attention_config.sparse_config.sparse_impl=local"],
     "local_window_size >= 1"),
    ([f"{DIT}.attention_config.sparse_config.dense_timesteps=1"], "is dense, so the pattern would be ignored"),
    (["layer2.models.vae.attention_config.attn_impl=RADIAL_ATTN"], "Wan DiT's self-attention only"),
    (["target.device=cuda", "target.gpu=H100", "target.packages=[\"triton\", \"sol_attn\"]",
      f"{DIT}.attention_config.attn_impl=SOL_ATTN"], "has no runner for it"),
    ([f"{DIT}.attention_config.attn_impl=LOCAL_SPARSE_ATTN"], "local_window_size >= 1"),
    ([f"{DIT}.feature_cache_config.method=teacache"], "give its fit as feature_cache_config.coefficients"),
    ([f"{DIT}.feature_cache_config.method=static", f"{DIT}.feature_cache_config.compute_steps=[0, 4]"],
     "list steps below 4"),
    ([f"{DIT}.feature_cache_config.method=static"], "compute_steps is the static method's schedule"),
    ([f"{DIT}.feature_cache_config.method=first_block", f"{DIT}.feature_cache_config.first_blocks=2"],
     "at least one must be left"),
    (["layer2.models.vae.feature_cache_config.method=first_block"], "step caches wrap the block stack of a sampling stage's DiT"),
])
def test_refusals_are_the_compilers(overrides, needle):
    with pytest.raises(RecipeError) as info:
        compile_recipe(TINY, overrides)
    assert needle in " ".join(str(info.value).split())


def test_explain_shows_the_settings():
    from telefuser.compiler.explain import explain

    plan = compile_recipe(TINY, [*RADIAL, f"{DIT}.feature_cache_config.method=static",
                                 f"{DIT}.feature_cache_config.compute_steps=[0, 2]",
                                 f"{DIT}.feature_cache_config.max_consecutive_skips=1"])
    text = explain(plan)
    assert "sparse attention (the DiT's self-attention" in text and "density 0." in text
    assert "static: computes steps [0, 2] of 4; warm-up 0 step(s), at most 1 consecutive reuses" in text


# ------------------------------------------------------------------ the runtime, one rank


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("skip_work")


def run_plan(folder: Path, overrides: list[str], name: str, recipe: Path = TINY, **kwargs):
    pipe = telefuser.load_plan(str(write(compile_recipe(recipe, overrides), folder / f"{name}.json")))
    return pipe.run(progress=False, **kwargs)


@pytest.fixture(scope="module")
def baseline(folder):
    return run_plan(folder, [], "baseline", prompt=PROMPT, seed=SEED).frames


@pytest.fixture
def recorded_caches(monkeypatch):
    """Every cache the runtime attaches (their decisions survive `detach`)."""
    import telefuser.runtime.caches as caches

    made = []
    original = caches.apply_step_cache

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(caches, "apply_step_cache", recording)
    return made


@pytest.mark.parametrize("method", [
    ["method=first_block"],
    ["method=teacache", "coefficients=[1.0, 0.0]"],  # rel change itself (the tiny DiT has no published fit)
])
def test_threshold_zero_is_bit_identical(folder, baseline, method):
    video = run_plan(folder, [f"{DIT}.feature_cache_config.{m}" for m in method], "zero", prompt=PROMPT, seed=SEED)
    assert np.array_equal(video.frames, baseline)
    assert video.timings.step_cache == {"dit": {"cond": {"computed": 4, "reused": 0},
                                                "uncond": {"computed": 4, "reused": 0}}}
    assert "cache     dit: cond 4 computed / 0 reused, uncond 4 computed / 0 reused" in video.timings.summary()


def test_static_schedule_follows_the_hand_computed_sequence(folder, baseline, recorded_caches):
    """compute_steps [0], warm-up 2, at most 1 reuse in a row over 4 steps: step 0 and 1 compute (warm-up), 2
    reuses, 3 computes (one reuse in a row already), for each branch; a second video starts afresh."""
    overrides = [f"{DIT}.feature_cache_config.{k}" for k in
                 ("method=static", "compute_steps=[0]", "warmup_steps=2", "max_consecutive_skips=1")]
    pipe = telefuser.load_plan(str(write(compile_recipe(TINY, overrides), folder / "static.json")))
    first = pipe.run(prompt=PROMPT, seed=SEED, progress=False)
    second = pipe.run(prompt=PROMPT, seed=SEED, progress=False)
    expected = [(s, b, s != 2) for s in range(4) for b in ("cond", "uncond")]
    assert [c.decisions for c in recorded_caches] == [expected, expected]
    assert first.timings.step_cache["dit"] == {"cond": {"computed": 3, "reused": 1},
                                               "uncond": {"computed": 3, "reused": 1}}
    assert np.array_equal(first.frames, second.frames) and not np.array_equal(first.frames, baseline)


def test_taylorseer_runs(folder, baseline):
    video = run_plan(folder, [f"{DIT}.feature_cache_config.method=taylorseer"], "taylor", prompt=PROMPT, seed=SEED)
    assert video.timings.step_cache["dit"]["cond"] == {"computed": 2, "reused": 2}  # interval 2: steps 0 and 2
    assert not np.array_equal(video.frames, baseline)


def test_sparse_attention_all_dense_is_bit_identical_and_sparse_equals_the_hand_bound_seam(folder, baseline):
    dense = run_plan(folder, [*RADIAL, f"{DIT}.attention_config.sparse_config.dense_timesteps=4"], "dense",
                     prompt=PROMPT, seed=SEED)
    assert np.array_equal(dense.frames, baseline)  # every step dense: SDPA, as TORCH_SDPA
    planned = run_plan(folder, [*RADIAL, f"{DIT}.attention_config.sparse_config.dense_layers=1"], "sparse",
                       prompt=PROMPT, seed=SEED).frames
    assert not np.array_equal(planned, baseline)

    # the same pattern bound by hand at the attend seam of the dense plan (PyTorch reference, layer 0 dense)
    from types import SimpleNamespace

    from telefuser.ops import sparse_attention as sa
    from telefuser.ops.attention import attention

    pipe = telefuser.load_plan(str(folder / "baseline.json"))
    cfg = SimpleNamespace(sparse_impl="radial", block_size=16, decay_factor=1.0, dense_timesteps=0, dense_layers=1)
    for index, block in enumerate(pipe.placements["dit"].module.blocks):
        block.self_attn.attend = lambda q, k, v, index=index: sa.sparse_or_dense_attention(
            q, k, v, cfg, (3, 9, 16), 0, index, dense=attention, use_kernel=False)
    assert np.array_equal(pipe.run(prompt=PROMPT, seed=SEED, progress=False).frames, planned)


def test_quantised_sparse_runs_the_pattern_and_dense_steps_quantised(folder):
    """SAGE_ATTN_2_8_16 + radial on the tiny plan (CPU: the kernel's arithmetic in PyTorch): every step dense gives
    the dense quantised plan's frames byte for byte (dense steps run the quantised attention, as Radial Attention's
    use_sage_attention does); sparse steps give what the pattern bound by hand at the seam gives."""
    two = ["layer2.num_inference_steps=2"]  # the interpreted kernel costs ~2.4 s per tiny CFG step
    sage = run_plan(folder, [f"{DIT}.attention_config.attn_impl=SAGE_ATTN_2_8_16", *two], "sage", prompt=PROMPT,
                    seed=SEED).frames
    dense = run_plan(folder, [*SAGE_RADIAL, *two, f"{DIT}.attention_config.sparse_config.dense_timesteps=2"],
                     "sage_dense", prompt=PROMPT, seed=SEED).frames
    assert np.array_equal(dense, sage)
    planned = run_plan(folder, [*SAGE_RADIAL, *two, f"{DIT}.attention_config.sparse_config.dense_layers=1"],
                       "sage_sparse", prompt=PROMPT, seed=SEED).frames
    assert not np.array_equal(planned, sage)

    from types import SimpleNamespace

    from telefuser.ops import sparse_attention as sa
    from telefuser.ops.attention import attention

    pipe = telefuser.load_plan(str(folder / "sage.json"))
    cfg = SimpleNamespace(sparse_impl="radial", block_size=32, decay_factor=1.0, dense_timesteps=0, dense_layers=1)

    def attend(q, k, v, index):
        if index < 1:
            return attention(q, k, v, "SAGE_ATTN_2_8_16")
        return sa.sparse_attention(q, k, v, layout=sa.block_layout_for(cfg, (3, 9, 16)), use_kernel=False,
                                   quantized="SAGE_ATTN_2_8_16")

    for index, block in enumerate(pipe.placements["dit"].module.blocks):
        block.self_attn.attend = lambda q, k, v, index=index: attend(q, k, v, index)
    assert np.array_equal(pipe.run(prompt=PROMPT, seed=SEED, progress=False).frames, planned)


def test_moe_plan_one_cache_per_expert(folder, recorded_caches):
    """Wan2.2's pair (steps 0, 1 high-noise; 2, 3 low-noise), compute_steps [0, 2]: each expert computes its first
    step and reuses its second; each expert's cache starts empty at the switch."""
    rng = np.random.default_rng(0)
    image = (rng.random((144, 256, 3)) * 255).astype(np.uint8)
    recipe = RECIPES / "tiny_wan22_i2v.toml"
    overrides = [f"layer2.models.{m}.feature_cache_config.{k}" for m in ("dit_high", "dit_low")
                 for k in ("method=static", "compute_steps=[0, 2]")]
    video = run_plan(folder, overrides, "moe", recipe=recipe, prompt="a lighthouse", seed=2, image=image)
    assert [c.decisions for c in recorded_caches] == [
        [(0, "cond", True), (0, "uncond", True), (1, "cond", False), (1, "uncond", False)],
        [(2, "cond", True), (2, "uncond", True), (3, "cond", False), (3, "uncond", False)]]
    assert video.timings.step_cache == {m: {"cond": {"computed": 1, "reused": 1}, "uncond": {"computed": 1, "reused": 1}}
                                        for m in ("dit_high", "dit_low")}


# ------------------------------------------------------------------ several ranks (gloo)

DRIVER = (
    "import json, os, sys, numpy as np, telefuser\n"
    "video = telefuser.load_plan(sys.argv[1]).run(prompt=sys.argv[2], seed=int(sys.argv[3]), progress=False)\n"
    "if video is not None:\n"
    "    np.save(sys.argv[4], video.frames)\n"
    "    open(sys.argv[4] + '.json', 'w').write(json.dumps(video.timings.step_cache))\n"
)


@pytest.mark.parametrize("layout, extra", [
    (["cfg_degree=2"], [f"{DIT}.feature_cache_config.method=static", f"{DIT}.feature_cache_config.compute_steps=[0, 2]"]),
    (["sp_ulysses_degree=2"], [*RADIAL, f"{DIT}.feature_cache_config.method=first_block"]),
])
def test_two_gloo_ranks_give_the_one_rank_video(folder, tmp_path, monkeypatch, layout, extra):
    """cfg 2: each rank caches its own branch, the summary has both; Ulysses 2: the radial mask on each rank's
    heads, the first-block decision summed over the sequence ranks."""
    from telefuser.distributed.launch import run_local_ranks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = run_plan(folder, extra, "one_rank", prompt=PROMPT, seed=SEED)
    plan = write(compile_recipe(TINY, ["target.num_devices=2", *(f"layer2.parallel_config.{d}" for d in layout),
                                       *extra]), tmp_path / "two.json")
    out = tmp_path / "frames.npy"
    assert run_local_ranks([sys.executable, "-c", DRIVER, str(plan), PROMPT, str(SEED), str(out)], 2) == 0
    frames = np.load(out)
    diff = np.abs(frames.astype(int) - one.frames.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert json.loads(Path(str(out) + ".json").read_text()) == one.timings.step_cache


def test_local_pattern_and_composition_with_compile_and_block_offload(folder, baseline):
    """LOCAL_SPARSE_ATTN end to end; radial + a static cache give the same frames with the blocks compiled
    (backend eager: dynamo traces the wrappers) and with the blocks streamed (ASYNC_CPU_OFFLOAD)."""
    local = run_plan(folder, [f"{DIT}.attention_config.attn_impl=LOCAL_SPARSE_ATTN",
                              f"{DIT}.attention_config.sparse_config.local_window_size=2",
                              f"{DIT}.attention_config.sparse_config.block_size=16"], "local", prompt=PROMPT, seed=SEED)
    assert local.frames.shape == baseline.shape and not np.array_equal(local.frames, baseline)
    both = [*RADIAL, f"{DIT}.feature_cache_config.method=static", f"{DIT}.feature_cache_config.compute_steps=[0, 2]"]
    plain = run_plan(folder, both, "both", prompt=PROMPT, seed=SEED)
    for extra in ([f"{DIT}.compile_config.enabled=true", f"{DIT}.compile_config.backend=eager"],
                  [f"{DIT}.offload_config.offload_type=ASYNC_CPU_OFFLOAD", f"{DIT}.offload_config.blocks_per_group=1"]):
        video = run_plan(folder, [*both, *extra], "both_extra", prompt=PROMPT, seed=SEED)
        assert np.array_equal(video.frames, plain.frames) and video.timings.step_cache == plain.timings.step_cache


def test_memory_estimate_counts_the_cached_residuals():
    """Per CFG branch the block stack's residual [S, dim] (float32 here), twice for first_block; under cfg parallel
    one branch per rank."""
    plain = compile_recipe(TINY).memory
    tokens, dim = plain.at["tokens"], 64
    for method, tensors in (("static", 1), ("first_block", 2)):
        extra = [f"{DIT}.feature_cache_config.method={method}"]
        if method == "static":
            extra.append(f"{DIT}.feature_cache_config.compute_steps=[0, 2]")
        cached = compile_recipe(TINY, extra).memory
        assert cached.breakdown["activations.dit"] - plain.breakdown["activations.dit"] == 2 * tensors * tokens * dim * 4
    cfg2 = ["target.num_devices=2", "layer2.parallel_config.cfg_degree=2"]
    one_branch = compile_recipe(TINY, [*cfg2, f"{DIT}.feature_cache_config.method=first_block"]).memory
    assert one_branch.breakdown["activations.dit"] - compile_recipe(TINY, cfg2).memory.breakdown["activations.dit"] \
        == 2 * tokens * dim * 4
