"""Step caches and block compilation on HunyuanVideo-1.5's DiT.

Model level: a small HunyuanVideo15DiT with double- and single-stream blocks under a guided Euler loop shaped like the
hy15_denoise stage (cond, then uncond per step): threshold 0 (never reuse) is the uncached model bit for bit; a reused
step's output is the DiT's final layer applied to (the stack's input + the residual of the last computed step), both
read off the uncached model by hooks; TeaCache's decisions follow LightX2V's rule computed here by hand from block 0's
modulated input (numpy.poly1d). Plan level (tiny_hy15, 3 steps, CFG 6): the same video byte for byte at threshold 0,
a static schedule's hand-computed decisions, the refusals, cfg 2 on two gloo ranks equal to one rank, and the blocks
compiled (backend "eager", as the Wan tests) giving the uncompiled frames.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.errors import RecipeError
from telefuser.models.hunyuan15.dit import HunyuanVideo15DiT, HunyuanVideo15DiTConfig
from telefuser.runtime.caches import HY15_COEFFICIENTS, apply_step_cache
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny_hy15.toml"
DIT = "layer2.models.dit"
PROMPT, SEED = 'A red "STOP" sign in the rain', 7
TIMESTEPS = [1000.0, 950.0, 880.0, 800.0, 650.0]


@pytest.fixture(scope="module")
def dit() -> HunyuanVideo15DiT:
    torch.manual_seed(0)
    cfg = HunyuanVideo15DiTConfig(in_channels=9, out_channels=4, hidden_size=32, heads_num=2, mlp_hidden_dim=64,
                                  double_blocks=2, single_blocks=2, patch_size=[1, 1, 1], rope_dim_list=[4, 6, 6],
                                  text_states_dim=24, refiner_blocks=1, byt5_dim=16, byt5_hidden=32,
                                  vision_states_dim=8)
    model = HunyuanVideo15DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised gates in a fresh module: give every weight a value
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 2, 4, 4, generator=g)
    cond = (torch.randn(1, 6, 24, generator=g), torch.ones(1, 6, dtype=torch.bool))
    uncond = (torch.randn(1, 5, 24, generator=g), torch.ones(1, 5, dtype=torch.bool))
    return x, cond, uncond


@torch.no_grad()
def denoise(model, timesteps=TIMESTEPS, scale: float = 6.0):
    """hy15_denoise's loop: y = zero conditioning, cond then uncond, Euler on sigma = t / 1000."""
    x, cond, uncond = inputs()
    y = torch.zeros(1, 5, *x.shape[2:])
    sigmas = [t / 1000 for t in timesteps] + [0.0]
    outs = []
    for i, t in enumerate(timesteps):
        tt = torch.tensor([t])
        v_c = model(x, tt, *cond, y=y)
        v_u = model(x, tt, *uncond, y=y)
        outs.append((v_c, v_u))
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + scale * (v_c - v_u))
    return x, outs


@pytest.mark.parametrize("method,kwargs", [("first_block", {}), ("static", {"compute_steps": range(len(TIMESTEPS))}),
                                           ("taylorseer", {"interval": 1, "order": 2}),
                                           ("teacache", {"coefficients": "hunyuan_video15_t2v_480p"}),
                                           ("teacache", {"coefficients": "hunyuan_video15_i2v_720p"})])
def test_threshold_zero_is_bit_identical(dit, method, kwargs):
    ref, ref_out = denoise(dit)
    cache = apply_step_cache(dit, method, 0.0, **kwargs)
    try:
        got, got_out = denoise(dit)
    finally:
        cache.detach()
    assert torch.equal(got, ref)
    assert all(torch.equal(a, b) for pa, pb in zip(got_out, ref_out) for a, b in zip(pa, pb))
    n = len(TIMESTEPS)
    assert cache.stats() == {"cond": {"computed": n, "reused": 0}, "uncond": {"computed": n, "reused": 0}}
    blocks = [*dit.double_blocks, *dit.single_blocks]
    assert "forward" not in dit.__dict__ and all("forward" not in b.__dict__ for b in blocks)


def _record(model):
    """Hooks on the uncached model: block 0's arguments and the final layer's input (the stack's output) per call."""
    seen: dict[str, list] = {"block0": [], "final": []}
    hooks = [model.double_blocks[0].register_forward_pre_hook(lambda m, a: seen["block0"].append(a)),
             model.final_layer.register_forward_pre_hook(lambda m, a: seen["final"].append(a))]
    return seen, hooks


def test_static_reuse_is_the_final_layer_on_input_plus_the_last_residual(dit):
    """compute_steps [0, 3]: steps 1, 2 and 4 add the stack residual of steps 0 / 3 (per branch) to the stack's
    input; the expected outputs are built from the uncached model's own tensors at those points."""
    cache = apply_step_cache(dit, "static", compute_steps=[0, 3])
    seen, hooks = _record(dit)
    try:
        _, got = denoise(dit)
    finally:
        cache.detach()
        for h in hooks:
            h.remove()
    assert [c for _, _, c in cache.decisions] == [True, True, False, False, False, False, True, True, False, False]
    with torch.no_grad():
        for branch in range(2):
            residual = None
            for step in range(len(TIMESTEPS)):
                call = 2 * step + branch
                img, _txt, vec = seen["block0"][call][:3]  # the stack's input (block 0's pre-hook fires either way)
                stack_out = seen["final"][call][0]
                if step in (0, 3):
                    residual = stack_out - img  # this branch's residual of its last computed step
                    continue
                assert torch.equal(stack_out, img + residual)
                assert torch.equal(got[step][branch], dit.unpatchify(dit.final_layer(img + residual, vec), (2, 4, 4)))


def test_teacache_decisions_by_hand(dit):
    """LightX2V's rule on block 0's modulated input, per branch: steps 0 and the last compute; otherwise accumulate
    poly(rel L1 against the previous call of the branch) and reuse while under the threshold."""
    seen, hooks = _record(dit)
    try:
        denoise(dit)  # uncached: block 0's inputs at every call
    finally:
        for h in hooks:
            h.remove()
    # random weights move the input far more than trained ones: the published fits go negative there, so a positive
    # polynomial of our own (the published keys' mechanism is the same: test_threshold_zero, the plan's records)
    coefficients = (3.0, 0.01)
    poly = np.poly1d(coefficients)
    block = dit.double_blocks[0]
    with torch.no_grad():
        mod = []
        for img, _txt, vec in (a[:3] for a in seen["block0"]):
            shift, scale = (c.float() for c in block.img_mod.linear(F.silu(vec)).chunk(6, dim=-1)[:2])
            mod.append(F.layer_norm(img.float(), img.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
    rels = {b: [float((mod[2 * s + b] - mod[2 * (s - 1) + b]).abs().mean() / mod[2 * (s - 1) + b].abs().mean())
                for s in range(1, len(TIMESTEPS))] for b in range(2)}
    values = sorted(poly(r) for b in rels for r in rels[b])
    threshold = float(values[len(values) // 2]) * 1.5  # reuses some steps and computes others
    expected, acc = [], {0: 0.0, 1: 0.0}
    for s in range(len(TIMESTEPS)):
        for b in range(2):
            if s in (0, len(TIMESTEPS) - 1):
                acc[b] = 0.0
                expected.append(True)
                continue
            total = acc[b] + poly(rels[b][s - 1])
            reuse = total < threshold
            acc[b] = total if reuse else 0.0
            expected.append(not reuse)
    cache = apply_step_cache(dit, "teacache", threshold, coefficients=coefficients, teacache_input="modulated",
                             num_inference_steps=len(TIMESTEPS), final_steps=1)
    try:
        denoise(dit)
    finally:
        cache.detach()
    assert [c for _, _, c in cache.decisions] == expected
    assert False in expected and expected.count(True) > 4  # the rule reused and computed


# ------------------------------------------------------------------ the tiny plan


def run_plan(folder: Path, overrides: list[str], name: str, **kwargs):
    plan = folder / f"{name}.json"
    plan.write_text(pretty_json(compile_recipe(TINY, overrides).model_dump(mode="json", by_alias=True)))
    return telefuser.load_plan(str(plan)).run(prompt=PROMPT, seed=SEED, progress=False, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("hy15_caches")


@pytest.fixture(scope="module")
def baseline(folder):
    return run_plan(folder, [], "baseline").frames


def cache(*settings: str) -> list[str]:
    return [f"{DIT}.feature_cache_config.{s}" for s in settings]


def test_plan_threshold_zero_and_static_schedule(folder, baseline):
    same = run_plan(folder, cache("method=first_block", "threshold=0"), "first_block")
    assert np.array_equal(same.frames, baseline)
    assert same.timings.step_cache == {"dit": {"cond": {"computed": 3, "reused": 0}, "uncond": {"computed": 3, "reused": 0}}}
    tea = run_plan(folder, cache("method=teacache", "threshold=0", "coefficients=[1.0, 0.0]"), "teacache")
    assert np.array_equal(tea.frames, baseline)
    # compute_steps [0], warm-up 0, at most 1 reuse in a row: C R C per branch (step 2 forced after one reuse)
    static = run_plan(folder, cache("method=static", "compute_steps=[0]", "max_consecutive_skips=1"), "static")
    assert static.timings.step_cache == {"dit": {"cond": {"computed": 2, "reused": 1},
                                                 "uncond": {"computed": 2, "reused": 1}}}
    assert not np.array_equal(static.frames, baseline)
    taylor = run_plan(folder, cache("method=taylorseer", "interval=2", "order=1"), "taylor")
    assert taylor.timings.step_cache["dit"]["cond"] == {"computed": 2, "reused": 1}


def test_plan_records_and_refusals():
    plan = compile_recipe(TINY, cache("method=first_block", "threshold=0.05"))
    denoise = next(s for s in plan.stages if s.kind == "hy15_denoise")
    assert denoise.params["step_cache"]["dit"]["first_blocks"] == 1
    with pytest.raises(RecipeError, match="first_blocks = 2: the DiT has 2 blocks"):
        compile_recipe(TINY, cache("method=first_block", "first_blocks=2"))
    # the tiny DiT (hidden 64) has no published fit: teacache needs the coefficients
    with pytest.raises(RecipeError, match="HunyuanVideo-1.5 8.3B DiT's T2V/I2V 480p/720p"):
        compile_recipe(TINY, cache("method=teacache", "threshold=0.1"))
    sr_cache = "layer2.models.dit_sr.feature_cache_config."
    with pytest.raises(RecipeError, match="no rescaling polynomial is published for it"):
        compile_recipe(RECIPES / "tiny_hy15_sr.toml", [f"{sr_cache}method=teacache"])
    with pytest.raises(RecipeError, match="layer2.sr_config.num_inference_steps = 3; list steps below 3"):
        compile_recipe(RECIPES / "tiny_hy15_sr.toml", [f"{sr_cache}method=static", f"{sr_cache}compute_steps=[0, 3]"])


def test_sr_dit_step_cache(tmp_path):
    """The SR stage's DiT cached as the base DiT is (one branch: guidance 1), counted over the SR stage's own 3 steps:
    threshold 0 gives the uncached video byte for byte, a static schedule reuses what it says."""
    def sr_run(overrides: list[str], name: str):
        plan = compile_recipe(RECIPES / "tiny_hy15_sr.toml", overrides)
        path = tmp_path / f"{name}.json"
        path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
        return plan, telefuser.load_plan(str(path)).run(prompt=PROMPT, seed=SEED, progress=False)

    sr_cache = "layer2.models.dit_sr.feature_cache_config."
    _, plain = sr_run([], "plain")
    plan, same = sr_run([f"{sr_cache}method=first_block", f"{sr_cache}threshold=0"], "first_block")
    record = next(s for s in plan.stages if s.kind == "hy15_sr").params["step_cache"]["dit_sr"]
    assert record["num_inference_steps"] == 3 and plan.memory.breakdown["activations.dit_sr"] > 0
    assert np.array_equal(same.frames, plain.frames)
    assert same.timings.step_cache == {"dit_sr": {"cond": {"computed": 3, "reused": 0}}}
    _, static = sr_run([f"{sr_cache}method=static", f"{sr_cache}compute_steps=[0, 2]"], "static")
    assert static.timings.step_cache["dit_sr"]["cond"] == {"computed": 2, "reused": 1}
    assert not np.array_equal(static.frames, plain.frames)


def test_published_dit_gets_lightx2v_fit(tmp_path, monkeypatch):
    from bench.hy15_files import write_hunyuan15_root

    write_hunyuan15_root(tmp_path)
    monkeypatch.setenv("TELEFUSER_MODEL_ROOT", str(tmp_path))
    for recipe, key in (("hunyuan15_t2v_480p", "hunyuan_video15_t2v_480p"),
                        ("hunyuan15_t2v_720p", "hunyuan_video15_t2v_720p"),
                        ("hunyuan15_i2v_480p_step_distilled", "hunyuan_video15_i2v_480p")):
        plan = compile_recipe(RECIPES / f"{recipe}.toml", cache("method=teacache", "threshold=0.15"))
        record = next(s for s in plan.stages if s.kind == "hy15_denoise").params["step_cache"]["dit"]
        assert record["coefficients_source"] == key and record["teacache_input"] == "modulated"
        assert tuple(record["coefficients"]) == HY15_COEFFICIENTS[key] and record["final_steps"] == 1


DRIVER = (
    "import json, sys, numpy as np, telefuser\n"
    "video = telefuser.load_plan(sys.argv[1]).run(prompt=sys.argv[2], seed=int(sys.argv[3]), progress=False)\n"
    "if video is not None:\n"
    "    np.save(sys.argv[4], video.frames)\n"
    "    open(sys.argv[4] + '.json', 'w').write(json.dumps(video.timings.step_cache))\n"
)


@pytest.mark.parametrize("layout, settings, counts", [
    ("cfg_degree=2", ("method=static", "compute_steps=[0, 2]"), {"computed": 2, "reused": 1}),
    # a threshold every distance is under: step 0 computes (nothing to compare), steps 1 and 2 reuse on both ranks,
    # the sharded video stream's residual added back on each rank's shard
    ("sp_ulysses_degree=2", ("method=first_block", "threshold=1000000"), {"computed": 1, "reused": 2}),
])
def test_two_gloo_ranks_give_the_one_rank_video(folder, tmp_path, monkeypatch, layout, settings, counts):
    """cfg 2: each cfg rank caches its own branch and the counts of both come back on rank 0; Ulysses 2: the
    first-block sums go over the sequence ranks, which reuse alike."""
    from telefuser.distributed.launch import run_local_ranks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = run_plan(folder, cache(*settings), f"one_rank_{layout}")
    plan = tmp_path / "two.json"
    plan.write_text(pretty_json(compile_recipe(TINY, ["target.num_devices=2", f"layer2.parallel_config.{layout}",
                                                      *cache(*settings)]).model_dump(mode="json", by_alias=True)))
    out = tmp_path / "frames.npy"
    assert run_local_ranks([sys.executable, "-c", DRIVER, str(plan), PROMPT, str(SEED), str(out)], 2) == 0
    diff = np.abs(np.load(out).astype(int) - one.frames.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert json.loads(Path(str(out) + ".json").read_text()) == one.timings.step_cache
    assert one.timings.step_cache["dit"] == {"cond": counts, "uncond": counts}


def test_compiled_blocks_give_the_same_frames(folder, baseline):
    compiled = ["compile_config.enabled=true", "compile_config.backend=eager"]
    got = run_plan(folder, [f"{DIT}.{s}" for s in compiled], "compiled")
    assert np.array_equal(got.frames, baseline)
    # a cache over compiled blocks: dynamo traces the wrappers
    both = run_plan(folder, [f"{DIT}.{s}" for s in compiled] + cache("method=static", "compute_steps=[0, 2]"), "both")
    plain = run_plan(folder, cache("method=static", "compute_steps=[0, 2]"), "plain_static")
    assert np.array_equal(both.frames, plain.frames)
