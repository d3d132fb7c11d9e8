"""Step caches (telefuser.runtime.caches) around the tiny WanDiT: threshold 0 is the uncached model bit for bit,
thresholds give the skip sequences computed here by hand from the published rules, the static schedule
reuses exactly the listed steps, state is per CFG branch and per video."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from telefuser.models.tiny import TINY_ARCH, tiny_state_dict
from telefuser.models.wan.dit import WanDiT, WanDiTConfig
from telefuser.runtime.caches import apply_step_cache, compute_steps_from_mask

TIMESTEPS = [999.0, 950.0, 900.0, 800.0, 700.0, 500.0]


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = WanDiT(WanDiTConfig(**TINY_ARCH["dit"]))
    model.load_state_dict(tiny_state_dict("dit", TINY_ARCH["dit"]))
    return model.eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)  # 2 x 4 x 4 = 32 tokens
    cond = torch.randn(1, 8, TINY_ARCH["dit"]["text_dim"], generator=g)
    uncond = torch.randn(1, 8, TINY_ARCH["dit"]["text_dim"], generator=g)
    return x, cond, uncond


@torch.no_grad()
def denoise(model, timesteps=TIMESTEPS, cfg=True, seed=0, scale=5.0):
    """A guided Euler flow loop shaped like runtime/stages/denoise.py (cond then uncond per step)."""
    x, cond, uncond = inputs(seed)
    outputs = []
    sigmas = [t / 1000 for t in timesteps] + [0.0]
    for i, t in enumerate(timesteps):
        tt = torch.tensor([t])
        v = model(x, tt, cond)
        if cfg:
            u = model(x, tt, uncond)
            outputs.append((v, u))
            v = u + scale * (v - u)
        else:
            outputs.append((v,))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, outputs


@pytest.mark.parametrize("method,kwargs", [("teacache", {"coefficients": "wan2.1_t2v_1.3b"}),
                                           ("teacache", {"coefficients": "wan2.1_t2v_14b"}),  # negative near 0
                                           ("first_block", {}),
                                           ("static", {"compute_steps": range(len(TIMESTEPS))}),
                                           ("taylorseer", {"interval": 1, "order": 2})])
def test_threshold_zero_is_bit_identical(dit, method, kwargs):
    ref, ref_out = denoise(dit)
    cache = apply_step_cache(dit, method, 0.0, **kwargs)
    try:
        got, got_out = denoise(dit)
    finally:
        cache.detach()
    assert torch.equal(got, ref)
    assert all(torch.equal(a, b) for pa, pb in zip(got_out, ref_out) for a, b in zip(pa, pb))
    assert cache.stats() == {"cond": {"computed": 6, "reused": 0}, "uncond": {"computed": 6, "reused": 0}}
    assert "forward" not in dit.__dict__ and all("forward" not in b.__dict__ for b in dit.blocks)


@torch.no_grad()
def manual_forward(dit, x, t, context, residual=None):
    """WanDiT.forward written out here, with the block stack replaced by `+ residual` when given; returns
    (output, tokens before the blocks, tokens after block 0, tokens after the stack)."""
    tokens = dit.patch_embedding(x)
    grid = tuple(tokens.shape[2:])
    tokens = tokens.flatten(2).transpose(1, 2).contiguous()
    rope = dit.rope(grid, tokens.device)
    t_emb, e = dit.time_embeddings(t)
    ctx = dit.text_embedding(context)
    start = tokens
    after_first = None
    if residual is None:
        for i, block in enumerate(dit.blocks):
            tokens = block(tokens, e, ctx, rope, None)
            if i == 0:
                after_first = tokens
    else:
        tokens = tokens + residual
    return dit.unpatchify(dit.head(tokens, t_emb), grid), start, after_first, tokens


def rel_l1(a, b):
    return ((a - b).abs().mean() / b.abs().mean()).item()


def test_static_schedule_reuses_the_listed_steps(dit):
    mask = [1, 0, 1, 1, 0, 0]
    cache = apply_step_cache(dit, "static", compute_steps=compute_steps_from_mask(mask))
    try:
        _, outs = denoise(dit)
    finally:
        cache.detach()
    per_step = [[d[2] for d in cache.decisions if d[0] == s] for s in range(6)]
    assert per_step == [[bool(m)] * 2 for m in mask]
    assert cache.stats()["cond"] == {"computed": 3, "reused": 3}
    # a reused step adds the residual of the last computed step (3) to this step's own embedded tokens
    x, cond, _ = inputs()
    sigmas = [t / 1000 for t in TIMESTEPS] + [0.0]
    xs = [x]
    for i, (v, u) in enumerate(outs):
        xs.append(xs[-1] + (sigmas[i + 1] - sigmas[i]) * (u + 5.0 * (v - u)))
    _, start3, _, end3 = manual_forward(dit, xs[3], torch.tensor([TIMESTEPS[3]]), cond)
    expected, *_ = manual_forward(dit, xs[4], torch.tensor([TIMESTEPS[4]]), cond, residual=end3 - start3)
    assert torch.allclose(outs[4][0], expected, atol=1e-6, rtol=1e-5)


def test_warmup_and_max_consecutive_skips(dit):
    cache = apply_step_cache(dit, "static", compute_steps=[0], warmup_steps=2, max_consecutive_skips=2)
    try:
        denoise(dit, cfg=False)
    finally:
        cache.detach()
    # steps 0, 1 warm up; then 2 reuses in a row at most: 2, 3 reuse, 4 computes, 5 reuses
    assert [d[2] for d in cache.decisions] == [True, True, False, False, True, False]


@torch.no_grad()
def test_teacache_skip_sequence_by_hand(dit):
    """Fixed x and context, timesteps varying: TeaCache's decisions from the time embeddings, computed here
    with numpy.poly1d as the reference implementation does."""
    x, cond, _ = inputs()
    ts = [999.0, 998.99, 998.98, 998.9, 998.89, 998.88, 998.87, 998.5]  # the tiny time MLP is steep in t
    coefficients = [2.0, 0.5, 0.0]  # poly(r) = 2 r^2 + 0.5 r: a hand-checkable rescaling
    threshold = 0.004
    poly = np.poly1d(coefficients)
    embeds = [dit.time_embeddings(torch.tensor([t]))[0] for t in ts]
    expected, acc = [True], 0.0
    for prev, cur in zip(embeds, embeds[1:]):
        acc += poly(rel_l1(cur, prev))
        if acc < threshold:
            expected.append(False)
        else:
            expected.append(True)
            acc = 0.0
    assert True in expected[1:] and False in expected  # the example exercises both
    cache = apply_step_cache(dit, "teacache", threshold, coefficients=coefficients, branch_names=("cond",))
    try:
        outs = [dit(x, torch.tensor([t]), cond) for t in ts]
    finally:
        cache.detach()
    assert [d[2] for d in cache.decisions] == expected
    # a reused call: its own embeddings and head, the stack replaced by the last computed step's residual
    last = max(i for i in range(len(ts)) if expected[i] and i < expected.index(False, 1))
    reuse = expected.index(False, 1)
    _, start, _, end = manual_forward(dit, x, torch.tensor([ts[last]]), cond)
    ref, *_ = manual_forward(dit, x, torch.tensor([ts[reuse]]), cond, residual=end - start)
    assert torch.allclose(outs[reuse], ref, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_first_block_skip_sequence_by_hand(dit):
    """Fixed x and context: block 0's residual per timestep, compared with the last computed step's."""
    x, cond, _ = inputs()
    ts = [999.0, 995.0, 990.0, 950.0, 940.0, 700.0, 695.0]
    residuals = []
    for t in ts:
        _, start, after_first, _ = manual_forward(dit, x, torch.tensor([t]), cond)
        residuals.append(after_first - start)
    diffs = [rel_l1(residuals[i], residuals[0]) for i in range(1, len(ts))]
    ordered = sorted(diffs)
    threshold = (ordered[len(diffs) // 2] + ordered[len(diffs) // 2 - 1]) / 2  # between two: no float ties
    expected, last = [True], residuals[0]
    for r in residuals[1:]:
        if rel_l1(r, last) < threshold:
            expected.append(False)
        else:
            expected.append(True)
            last = r
    assert False in expected and expected.count(True) > 1
    cache = apply_step_cache(dit, "first_block", threshold, branch_names=("cond",))
    try:
        for t in ts:
            dit(x, torch.tensor([t]), cond)
    finally:
        cache.detach()
    assert [d[2] for d in cache.decisions] == expected


def test_state_per_branch_and_per_video(dit):
    cache = apply_step_cache(dit, "static", compute_steps=[0, 3])
    try:
        denoise(dit)
        first = cache.stats()
        assert first == {"cond": {"computed": 2, "reused": 4}, "uncond": {"computed": 2, "reused": 4}}
        assert [d[1] for d in cache.decisions[:4]] == ["cond", "uncond", "cond", "uncond"]
        denoise(dit, seed=1)  # the timesteps start again from 999: a new video, nothing carried over
        assert cache.stats() == first and len(cache.decisions) == 12
    finally:
        cache.detach()
    # the second video through a cache that ran a first one equals it through a fresh cache
    ref_cache = apply_step_cache(dit, "static", compute_steps=[0, 3])
    try:
        ref, _ = denoise(dit, seed=1)
    finally:
        ref_cache.detach()
    again = apply_step_cache(dit, "static", compute_steps=[0, 3])
    try:
        denoise(dit)
        got, _ = denoise(dit, seed=1)
    finally:
        again.detach()
    assert torch.equal(got, ref)


def test_begin_step_and_one_branch_per_rank(dit):
    """Explicit step indices (e.g. the low-noise expert of an MoE pair starting at step 3) and a cfg rank that
    only runs the unconditional branch."""
    x, _, uncond = inputs()
    cache = apply_step_cache(dit, "static", compute_steps=[3, 5], branch_names=("uncond",))
    try:
        with torch.no_grad():
            for i, t in zip(range(3, 6), TIMESTEPS[3:]):
                cache.begin_step(i)
                dit(x, torch.tensor([t]), uncond)
    finally:
        cache.detach()
    assert cache.decisions == [(3, "uncond", True), (4, "uncond", False), (5, "uncond", True)]


def test_refusals(dit):
    with pytest.raises(ValueError, match="unknown step cache"):
        apply_step_cache(dit, "magic")
    with pytest.raises(ValueError, match="compute_steps"):
        apply_step_cache(dit, "static")
    with pytest.raises(ValueError, match="no Wan2.1 polynomial"):
        apply_step_cache(dit, "teacache", 0.1)  # the tiny DiT's width was never fitted
    cache = apply_step_cache(dit, "first_block", 0.1)
    try:
        with pytest.raises(ValueError, match="already has a step cache"):
            apply_step_cache(dit, "first_block", 0.1)
    finally:
        cache.detach()


@torch.no_grad()
def test_moe_experts_keep_apart_states(dit):
    """Wan2.2's two experts are two DiTs, each with its own cache: the low-noise expert starts with nothing
    cached at the switch (its first step computes) and the high-noise one's state ends with its span."""
    low = WanDiT(WanDiTConfig(**TINY_ARCH["dit"]))
    low.load_state_dict({k: v * 0.9 for k, v in tiny_state_dict("dit", TINY_ARCH["dit"]).items()})
    high_cache = apply_step_cache(dit, "static", compute_steps=[0])
    low_cache = apply_step_cache(low, "static", compute_steps=[0])
    try:
        x, cond, uncond = inputs()
        for i, t in enumerate(TIMESTEPS):
            model = dit if i < 3 else low  # the boundary after 3 steps
            model(x, torch.tensor([t]), cond)
            model(x, torch.tensor([t]), uncond)
    finally:
        high_cache.detach()
        low_cache.detach()
    assert [d[2] for d in high_cache.decisions] == [True, True, False, False, False, False]
    assert [d[2] for d in low_cache.decisions] == [True, True, False, False, False, False]
    assert low_cache.stats() == {"cond": {"computed": 1, "reused": 2}, "uncond": {"computed": 1, "reused": 2}}


@torch.no_grad()
def test_first_block_reuse_adds_the_rest_of_the_stack(dit):
    """On a reused step block 0 still runs: the output is head(block0(x) + residual of blocks 1.. last)."""
    x, cond, _ = inputs()
    ts = [999.0, 998.999]  # nearly equal: the second step reuses at a loose threshold
    cache = apply_step_cache(dit, "first_block", 0.5, branch_names=("cond",))
    try:
        outs = [dit(x, torch.tensor([t]), cond) for t in ts]
    finally:
        cache.detach()
    assert [d[2] for d in cache.decisions] == [True, False]
    _, _, after_first0, end0 = manual_forward(dit, x, torch.tensor([ts[0]]), cond)
    _, start1, after_first1, _ = manual_forward(dit, x, torch.tensor([ts[1]]), cond)
    expected, *_ = manual_forward(dit, x, torch.tensor([ts[1]]), cond,
                                  residual=(after_first1 - start1) + (end0 - after_first0))
    assert torch.allclose(outs[1], expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("order", [1, 2])
def test_taylorseer_forecast_by_hand(dit, order):
    """Interval 2: steps 0, 2, 4 compute; a reused step adds the Taylor forecast of the stack residual from
    finite differences over the computed steps (step distance 2), written out here."""
    x, cond, _ = inputs()
    ts = [999.0, 998.0, 997.0, 996.0, 995.0, 994.0]
    cache = apply_step_cache(dit, "taylorseer", interval=2, order=order, branch_names=("cond",))
    try:
        outs = [dit(x, torch.tensor([t]), cond) for t in ts]
    finally:
        cache.detach()
    assert [d[2] for d in cache.decisions] == [True, False, True, False, True, False]
    r = {}
    for i in (0, 2, 4):
        _, start, _, end = manual_forward(dit, x, torch.tensor([ts[i]]), cond)
        r[i] = end - start
    d1_2, d1_4 = (r[2] - r[0]) / 2, (r[4] - r[2]) / 2
    forecasts = {1: r[0], 3: r[2] + d1_2}
    forecasts[5] = r[4] + d1_4 + ((d1_4 - d1_2) / 2 / 2 if order == 2 else 0)
    for step, residual in forecasts.items():
        expected, *_ = manual_forward(dit, x, torch.tensor([ts[step]]), cond, residual=residual)
        assert torch.allclose(outs[step], expected, atol=1e-5, rtol=1e-4), step


@torch.no_grad()
def test_first_block_sums_go_through_reduce_sums(dit):
    """Sequence parallel: the decision's two L1 sums are handed to reduce_sums (an all-reduce there) so every
    rank decides alike; doubling both (two equal shards) leaves the decisions unchanged."""
    x, cond, _ = inputs()
    ts = [999.0, 998.999, 998.998]
    seen = []

    def reduce_sums(sums):
        seen.append(sums.clone())
        return sums * 2

    plain = apply_step_cache(dit, "first_block", 0.5, branch_names=("cond",))
    try:
        for t in ts:
            dit(x, torch.tensor([t]), cond)
    finally:
        plain.detach()
    reduced = apply_step_cache(dit, "first_block", 0.5, branch_names=("cond",), reduce_sums=reduce_sums)
    try:
        for t in ts:
            dit(x, torch.tensor([t]), cond)
    finally:
        reduced.detach()
    assert reduced.decisions == plain.decisions and len(seen) == 2 and all(s.shape == (2,) for s in seen)
