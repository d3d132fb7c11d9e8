"""SSTA inside HunyuanVideo-1.5's DiT as the runtime runs it: the plan's sparse record bound to the DiT's attention
seams (`runtime.skip_work._SparseWrapper`), the SSTA_ATTN runner chosen by the dispatch table, on one rank and
under Ulysses (gloo), and whole tiny plans.

References and tolerances:
- one rank: the same DiT with every block's joint attention replaced by tests/test_ssta.py's float64 evaluation of
  the published SSTA (per video, its valid context keys from the DiT's key mask); 1e-5 absolute / 1e-4 relative,
  the float32 DiT's own rounding through two blocks (as tests/test_parallel_hy15.py);
- Ulysses 2 against one rank: the same tolerance (the heads' masks are per head, so each rank's head slice chooses
  the tiles one rank chooses for those heads);
- a tiny plan whose window covers every tile (and whose tiles divide the grid: no zero padding) is dense
  attention, so its video equals the dense plan's to float32 rounding through 3 steps and the VAE (2 of 255 levels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import telefuser
from gloo_ranks import spawn
from telefuser.compiler import compile_recipe
from telefuser.distributed.parallelize_hy15 import parallelize_hy15_dit
from telefuser.models.hunyuan15.dit import HunyuanVideo15DiT, HunyuanVideo15DiTConfig
from telefuser.ops.dispatch import use_dispatch
from telefuser.runtime.skip_work import _SparseWrapper
from telefuser.schema.canonical import pretty_json
from test_ssta import ref_ssta

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ATOL, RTOL = 1e-5, 1e-4
CONFIG = HunyuanVideo15DiTConfig(in_channels=9, out_channels=4, hidden_size=64, heads_num=4, mlp_hidden_dim=96,
                                 double_blocks=2, single_blocks=1, rope_dim_list=[4, 6, 6], text_states_dim=24,
                                 refiner_blocks=1, byt5_dim=8, byt5_hidden=16, vision_states_dim=12)
RECORD = {"sparse_impl": "ssta", "dense_timesteps": 0, "dense_layers": 1, "tile_size": [2, 2, 4], "win_size": [1, 3, 1],
          "ssta_topk": 4, "ssta_lambda": 0.7}  # block 0 dense; 16-token tiles; top-k halved to 2 (short video)


def dit_inputs(grid, batch):
    g = torch.Generator().manual_seed(sum(grid) + batch)
    text_mask = torch.ones(batch, 9, dtype=torch.int64)
    text_mask[-1, 6:] = 0  # the last video's prompt is shorter: a padded, masked context
    return {"x": torch.randn(batch, CONFIG.out_channels, *grid, generator=g), "t": torch.full((batch,), 650.0),
            "text_states": torch.randn(batch, 9, CONFIG.text_states_dim, generator=g), "text_mask": text_mask,
            "byt5_states": torch.randn(batch, 5, CONFIG.byt5_dim, generator=g),
            "byt5_mask": torch.ones(batch, 5, dtype=torch.int64),
            "vision_states": torch.randn(1, 4, CONFIG.vision_states_dim, generator=g),
            "y": torch.randn(batch, CONFIG.in_channels - CONFIG.out_channels, *grid, generator=g)}


def models():
    torch.manual_seed(0)
    a = HunyuanVideo15DiT(CONFIG).eval()
    b = HunyuanVideo15DiT(CONFIG).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def planned(dit, inputs):
    """The DiT's output with the plan's SSTA record attached as the runtime attaches it, at step 3."""
    wrapper = _SparseWrapper(dit, RECORD)
    wrapper.step = 3
    try:
        with use_dispatch({"attention": "SSTA_ATTN"}), torch.inference_mode():
            return dit(**inputs)
    finally:
        wrapper.detach()


def with_reference_attention(dit, grid):
    """Each seam's joint attention replaced by the float64 published SSTA (block 0 dense, as RECORD says)."""
    cfg = type("Cfg", (), {k: RECORD[k] for k in ("tile_size", "win_size", "ssta_topk", "ssta_lambda")})

    def attend_for(index):
        def attend(q, k, v, mask, video_tokens):
            assert video_tokens == int(np.prod(grid))
            keys = [k.shape[1]] * q.shape[0] if mask is None else mask.reshape(q.shape[0], -1).sum(-1).tolist()
            if index < RECORD["dense_layers"]:
                out = [torch.nn.functional.scaled_dot_product_attention(
                    *(t[b: b + 1, :n].double().transpose(1, 2) for t, n in ((q, q.shape[1]), (k, keys[b]), (v, keys[b])))
                ).transpose(1, 2)[0].numpy() for b in range(q.shape[0])]
            else:
                out = [ref_ssta(q[b].numpy(), k[b].numpy(), v[b].numpy(), grid, cfg, int(keys[b]))[0]
                       for b in range(q.shape[0])]
            return torch.from_numpy(np.stack(out)).to(q.dtype)
        return attend

    for index, seam in enumerate(dit.attention_seams()):
        seam.attend = attend_for(index)


@pytest.mark.parametrize("grid,batch", [((3, 3, 8), 1), ((3, 5, 6), 2)])  # (3, 5, 6): zero padding, a masked context
def test_dit_with_ssta_matches_the_published_forward(grid, batch):
    ours, ref = models()
    inputs = dit_inputs(grid, batch)
    got = planned(ours, inputs)
    with_reference_attention(ref, grid)
    with torch.inference_mode():
        expected = ref(**inputs)
        dense = HunyuanVideo15DiT(CONFIG).eval()
        dense.load_state_dict(ours.state_dict())
        unchanged = dense(**inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert (got - unchanged).abs().max() > 1e-3  # sparse attention did change the output
    assert "attend" not in ours.double_blocks[0].__dict__  # detached: the DiT is itself again


def _ulysses_worker() -> None:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("sp_ulysses",))
    for grid, batch in (((3, 3, 4), 1), ((3, 3, 3), 2)):  # 36 tokens: 18 per rank; 27: padded to 28
        reference, parallel = models()
        parallelize_hy15_dit(parallel, mesh)
        inputs = dit_inputs(grid, batch)
        torch.testing.assert_close(planned(parallel, inputs), planned(reference, inputs), atol=ATOL, rtol=RTOL)


def test_ssta_under_ulysses_2_ranks(monkeypatch):
    spawn(_ulysses_worker, 2, monkeypatch)


def _video(tmp_path, overrides):
    plan = compile_recipe(RECIPES / "tiny_hy15.toml", overrides)
    path = tmp_path / f"plan_{len(list(tmp_path.iterdir()))}.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return plan, telefuser.load_plan(str(path)).run(prompt="a red fox in snow", seed=5, progress=False).frames


def test_tiny_plans_with_ssta(tmp_path):
    ssta = ["layer2.models.dit.attention_config.attn_impl=SSTA_ATTN"]
    _, dense = _video(tmp_path, [])
    # the tiny grid is (2, 9, 16): tiles (1, 3, 16) divide it, and a (3, 3, 3) window covers all 2 x 3 x 1 tiles
    covering, frames = _video(tmp_path, [*ssta, "layer2.models.dit.attention_config.sparse_config.tile_size=[1,3,16]"])
    record = next(s for s in covering.stages if s.kind == "hy15_denoise").params["sparse_attention"]["dit"]
    assert record["density_window"] == 1.0 and record["block_size"] == 48
    assert np.abs(frames.astype(int) - dense.astype(int)).max() <= 2
    _, sparse = _video(tmp_path, [*ssta, "layer2.models.dit.attention_config.sparse_config.tile_size=[1,4,4]",
                                  "layer2.models.dit.attention_config.sparse_config.win_size=[1,1,1]"])
    assert sparse.shape == dense.shape and np.abs(sparse.astype(int) - dense.astype(int)).max() > 2


HY_DIT = "layer2.models.dit.attention_config"


@pytest.mark.parametrize("recipe, overrides, needle", [
    ("tiny.toml", [f"{HY_DIT}.attn_impl=SSTA_ATTN"], "SSTA is wired into HunyuanVideo-1.5's DiTs' joint attention"),
    ("tiny_hy15.toml", [f"{HY_DIT}.attn_impl=RADIAL_ATTN", f"{HY_DIT}.sparse_config.block_size=16"],
     "its joint attention runs SSTA"),
    ("tiny_hy15.toml", [f"{HY_DIT}.attn_impl=SSTA_ATTN", "target.num_devices=2",
                        "layer2.parallel_config.sp_ring_degree=2"], "sparse ring is not built"),
    ("tiny_hy15.toml", [f"{HY_DIT}.attn_impl=SSTA_ATTN", f"{HY_DIT}.sparse_config.tile_size=[3,5,5]"],
     "holds 75 tokens"),
    ("tiny_hy15.toml", [f"{HY_DIT}.attn_impl=SSTA_ATTN", f"{HY_DIT}.sparse_config.win_size=[2,3,3]"], "odd entries"),
    ("tiny_hy15.toml", [f"{HY_DIT}.attn_impl=SAGE_ATTN_2_8_16", f"{HY_DIT}.sparse_config.sparse_impl=ssta",
                        f"{HY_DIT}.sparse_config.tile_size=[1,4,4]"], "at least 32"),
])
def test_ssta_refusals_are_the_compilers(recipe, overrides, needle):
    from telefuser.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        compile_recipe(RECIPES / recipe, overrides)
    assert needle in " ".join(str(info.value).split())


def test_quantised_ssta_plan_records_the_pattern_and_runs(tmp_path):
    plan, frames = _video(tmp_path, [f"{HY_DIT}.attn_impl=SAGE_ATTN_2_8_16", f"{HY_DIT}.sparse_config.sparse_impl=ssta",
                                     f"{HY_DIT}.sparse_config.tile_size=[1,4,8]"])
    assert frames.shape == (5, 144, 256, 3) and frames.std() > 1
    record = next(s for s in plan.stages if s.kind == "hy15_denoise").params["sparse_attention"]["dit"]
    assert record["attn_impl"] == "SAGE_ATTN_2_8_16" and record["block_size"] == 32
    assert record["effective"] == {"tile_size": [1, 4, 8], "win_size": [3, 3, 3], "ssta_topk": 32}
    assert 0 < record["density_window"] <= record["density"] <= 1


def test_ssta_on_the_sr_dit(tmp_path):
    """An opt-in on the SR DiT (the published SR pipeline runs it dense): recorded at the SR frame's token grid (the
    tiny SR plan: one frame at 848x480 -> 1 x 30 x 53 tokens, one-frame tiles), run by the SR stage's wrapper."""
    sr_attn = "layer2.models.dit_sr.attention_config"
    plan = compile_recipe(RECIPES / "tiny_hy15_sr.toml", [f"{sr_attn}.attn_impl=SSTA_ATTN",
                                                          f"{sr_attn}.sparse_config.tile_size=[1,4,4]"])
    record = next(s for s in plan.stages if s.kind == "hy15_sr").params["sparse_attention"]["dit_sr"]
    assert record["density_grid"] == [1, 30, 53] and record["effective"]["win_size"] == [1, 1, 1]
    path = tmp_path / "plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    sparse = telefuser.load_plan(str(path)).run(prompt="a red fox in snow", seed=5, progress=False).frames
    dense_plan = compile_recipe(RECIPES / "tiny_hy15_sr.toml")
    path.write_text(pretty_json(dense_plan.model_dump(mode="json", by_alias=True)))
    dense = telefuser.load_plan(str(path)).run(prompt="a red fox in snow", seed=5, progress=False).frames
    assert sparse.shape == dense.shape and np.abs(sparse.astype(int) - dense.astype(int)).max() > 2


def test_reference_constructor_builds_the_toml_plan():
    """`AttentionConfig.ssta_attention(...)` in Python gives the plan the TOML keys give (plan_hash included)."""
    import telefuser
    from telefuser.compiler.recipe_loader import load_recipe
    from telefuser.core.config import AttentionConfig, ModelRuntimeConfig

    tiny = RECIPES / "tiny_hy15.toml"
    base = load_recipe(tiny).recipe
    config = AttentionConfig.ssta_attention(dense_timesteps=1, ssta_topk=3, tile_size=(1, 4, 8), win_size=(1, 3, 3))
    models = dict(base.layer2.models)
    models["dit"] = models.get("dit", ModelRuntimeConfig()).model_copy(update={"attention_config": config})
    recipe = base.model_copy(update={"layer2": base.layer2.model_copy(update={"models": models})})
    from_python = telefuser.compile(recipe, base_dir=tiny.parent)
    from_toml = compile_recipe(tiny, [f"{HY_DIT}.{k}" for k in (
        "attn_impl=SSTA_ATTN", "sparse_config.sparse_impl=ssta", "sparse_config.dense_timesteps=1",
        "sparse_config.ssta_topk=3", "sparse_config.tile_size=[1,4,8]", "sparse_config.win_size=[1,3,3]")])
    assert from_python.plan_hash == from_toml.plan_hash
