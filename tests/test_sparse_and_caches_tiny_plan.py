"""The step caches and sparse attention on the tiny plan, run end to end by the unchanged runtime: the cache
is attached to the loaded DiT from outside (as the integrator will do from the plan), the denoise stage calls
it as it calls any DiT (UniPC, CFG 5: cond then uncond per step), and its step/branch reading must fit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.ops import sparse_attention as sa
from telefuser.runtime.caches import apply_step_cache
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    plan = tmp_path_factory.mktemp("tiny_caches") / "tiny.plan.json"
    plan.write_text(pretty_json(compile_recipe(RECIPES / "tiny.toml").model_dump(mode="json", by_alias=True)))
    return telefuser.load_plan(str(plan))


def run(pipe):
    return pipe.run(prompt="a red fox running through fresh snow", seed=3, progress=False).frames


@pytest.fixture(scope="module")
def baseline(pipe):
    return run(pipe)


def test_caches_on_the_tiny_plan(pipe, baseline):
    dit = pipe.placements["dit"].module

    cache = apply_step_cache(dit, "first_block", 0.0)
    try:
        frames = run(pipe)
    finally:
        cache.detach()
    assert np.array_equal(frames, baseline)  # threshold 0: the same video, byte for byte
    assert cache.stats() == {"cond": {"computed": 4, "reused": 0}, "uncond": {"computed": 4, "reused": 0}}

    cache = apply_step_cache(dit, "static", compute_steps=[0, 2])
    try:
        first = run(pipe)
        assert cache.stats() == {"cond": {"computed": 2, "reused": 2}, "uncond": {"computed": 2, "reused": 2}}
        assert [d[:2] for d in cache.decisions[:4]] == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
        second = run(pipe)  # a new video: the timesteps start over, the cache resets itself
        assert cache.stats() == {"cond": {"computed": 2, "reused": 2}, "uncond": {"computed": 2, "reused": 2}}
    finally:
        cache.detach()
    assert np.array_equal(first, second) and not np.array_equal(first, baseline)
    assert "forward" not in dit.__dict__  # detached: the DiT is itself again


def test_sparse_attention_on_the_tiny_plan(pipe, baseline):
    """The attend seam bound to a radial mask over the tiny video's token grid (3 x 9 x 16 = 432 tokens, blocks
    of 16), the grid read off the DiT's input by a forward pre-hook."""
    from telefuser.ops.attention import attention

    dit = pipe.placements["dit"].module
    cfg = SimpleNamespace(sparse_impl="radial", block_size=16, decay_factor=1.0, dense_timesteps=0, dense_layers=1)
    seen = {}

    def grab_grid(_module, args):
        x = args[0]
        pt, ph, pw = dit.config.patch_size
        seen["grid"] = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)

    hook = dit.register_forward_pre_hook(grab_grid)
    for index, block in enumerate(dit.blocks):
        def attend(q, k, v, index=index):
            # the PyTorch reference: the kernel itself is tested apart (the interpreter would take ~30 s here)
            return sa.sparse_or_dense_attention(q, k, v, cfg, seen["grid"], 1, index, dense=attention,
                                                use_kernel=False)
        block.self_attn.attend = attend
    try:
        frames = run(pipe)
    finally:
        hook.remove()
        for block in dit.blocks:
            del block.self_attn.attend
    assert seen["grid"] == (3, 9, 16) and sa.density(sa.radial_block_mask((3, 9, 16), 16)) < 1
    assert frames.shape == baseline.shape and not np.array_equal(frames, baseline)


def test_caches_on_the_tiny_moe_plan(tmp_path):
    """Wan2.2's expert pair (4 steps: 2 high-noise, 2 low-noise): one cache per expert, each starting empty
    at its first step, threshold 0 byte-identical, a static schedule computing each expert's first step."""
    rng = np.random.default_rng(0)
    image = (rng.random((144, 256, 3)) * 255).astype(np.uint8)
    plan = tmp_path / "moe.plan.json"
    plan.write_text(pretty_json(compile_recipe(RECIPES / "tiny_wan22_i2v.toml").model_dump(mode="json",
                                                                                             by_alias=True)))
    pipe = telefuser.load_plan(str(plan))

    def video():
        return pipe.run(prompt="a lighthouse in a storm", seed=2, image=image, progress=False).frames

    baseline = video()
    high, low = pipe.placements["dit_high"].module, pipe.placements["dit_low"].module
    caches = [apply_step_cache(high, "first_block", 0.0), apply_step_cache(low, "first_block", 0.0)]
    try:
        assert np.array_equal(video(), baseline)
    finally:
        for c in caches:
            c.detach()
    assert [c.stats()["cond"] for c in caches] == [{"computed": 2, "reused": 0}] * 2
    caches = [apply_step_cache(high, "static", compute_steps=[0]), apply_step_cache(low, "static", compute_steps=[0])]
    try:
        frames = video()
    finally:
        for c in caches:
            c.detach()
    # each expert counts its own steps: its first computes (nothing cached at the switch), its second reuses
    assert [[d[2] for d in c.decisions] for c in caches] == [[True, True, False, False]] * 2
    assert not np.array_equal(frames, baseline)
