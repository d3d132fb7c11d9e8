"""HunyuanVideo-1.5 plans on several gloo ranks (started by the launcher, as telefuser-run does) against the one-rank
plan's frames: cfg 2, Ulysses 2, ring 2 with VAE parallel, cfg 2 x Ulysses 2 (4 ranks), image-to-video under
Ulysses 2, cfg 2 and ring 2 x tp 2 with VAE parallel (4 ranks), the SR stage under ring 2 (T2V) and Ulysses 2 (I2V),
dp 2 over two prompts,
tp 2, FSDP (the DiT and Qwen2.5-VL sharded) with cfg 2 and with Ulysses 2 (image-to-video), SSTA under Ulysses 2.

Tolerance, on uint8 frames: at most 1 level of 255 on any pixel and a mean absolute difference under 0.01 levels
(tests/test_hy15_plan.py's bound). cfg, dp and FSDP (which only moves weights) are the one-rank arithmetic (the same
DiT calls, exchanged); sequence parallelism reorders float32 sums in attention (ring: partial softmaxes merged by
log-sum-exp), tp those of the row-wise projections (all-reduce): a few 1e-7 per block, which after 3 steps can flip a
pixel's rounding at a .5 boundary, never more than one level. VAE parallel is bit for bit the one-rank tiled decode
with the same tile size, so its reference is that tiled decode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PROMPT, NEGATIVE, SEED = 'A red "STOP" sign in the rain', "blurry", 7
SECOND_PROMPT = "a quiet lake at dawn"
SP = "layer2.parallel_config."
TILES = ["layer2.tiled=true", "layer2.tile_size=[8, 8]"]  # 6 tiles of the 9 x 16 latent
SSTA = ["layer2.models.dit.attention_config.attn_impl=SSTA_ATTN",  # 16-token tiles of the 2 x 9 x 16 grid, top-1
        "layer2.models.dit.attention_config.sparse_config.tile_size=[1,4,4]",
        "layer2.models.dit.attention_config.sparse_config.win_size=[1,3,1]"]

# name: (recipe, ranks, parallel overrides, the one-rank reference's overrides)
CASES = {
    "cfg2": ("tiny_hy15", 2, [f"{SP}cfg_degree=2"], []),
    "ulysses2": ("tiny_hy15", 2, [f"{SP}sp_ulysses_degree=2"], []),
    "ring2_vae_parallel": ("tiny_hy15", 2, [f"{SP}sp_ring_degree=2", "layer2.enable_vae_parallel=true", TILES[1]],
                           TILES),
    "cfg2_ulysses2": ("tiny_hy15", 4, [f"{SP}cfg_degree=2", f"{SP}sp_ulysses_degree=2"], []),
    "i2v_ulysses2": ("tiny_hy15_i2v", 2, [f"{SP}sp_ulysses_degree=2"], []),
    "i2v_cfg2": ("tiny_hy15_i2v", 2, [f"{SP}cfg_degree=2"], []),
    "i2v_ring2_tp2_vae_parallel": ("tiny_hy15_i2v", 4, [f"{SP}sp_ring_degree=2", f"{SP}tp_degree=2",
                                                       "layer2.enable_vae_parallel=true", TILES[1]], TILES),
    "sr_ring2": ("tiny_hy15_sr", 2, [f"{SP}sp_ring_degree=2"], []),  # the base and the SR DiT sharded
    # I2V + SR: the image's SR-frame latent and SigLIP tokens made on the lead, broadcast to the other rank
    "i2v_sr_ulysses2": ("tiny_hy15_i2v_sr", 2, [f"{SP}sp_ulysses_degree=2"], []),
    "dp2": ("tiny_hy15", 2, [f"{SP}dp_degree=2"], []),
    "tp2": ("tiny_hy15", 2, [f"{SP}tp_degree=2"], []),
    "cfg2_fsdp": ("tiny_hy15", 2, [f"{SP}cfg_degree=2", f"{SP}enable_fsdp=true"], []),
    "ulysses2_fsdp": ("tiny_hy15_i2v", 2, [f"{SP}sp_ulysses_degree=2", f"{SP}enable_fsdp=true"], []),
    "ssta_ulysses2": ("tiny_hy15", 2, [f"{SP}sp_ulysses_degree=2", *SSTA], SSTA),  # each rank's heads pick their tiles
}
DRIVER = """import os, sys, numpy as np, telefuser
plan, out, image = sys.argv[1], sys.argv[2], (np.load(sys.argv[3]) if len(sys.argv) > 3 else None)
pipe = telefuser.load_plan(plan)
degrees = pipe.plan.mesh.degrees  # the sequence hooks are on the DiT exactly when the plan has sp ranks
for name in ('dit', 'dit_sr'):
    if name in pipe.placements:
        hooked = bool(pipe.placements[name].module.final_layer._forward_hooks)
        assert hooked == (degrees['sp_ulysses'] * degrees['sp_ring'] > 1), name
from torch.distributed.tensor import DTensor  # tp's (and FSDP's) DTensor weights exactly where the plan has them
dit_placement = pipe.plan.placement_of('dit')
distributed = any(isinstance(p, DTensor) for p in pipe.placements['dit'].module.parameters())
assert distributed == (degrees['tp'] > 1 or dit_placement.sharded)
from telefuser.distributed.fsdp import FSDPModule  # and FSDP's units exactly where the plan shards
for name in ('dit', 'text_encoder'):
    if name in pipe.placements:
        assert isinstance(pipe.placements[name].module, FSDPModule) == pipe.plan.placement_of(name).sharded, name
kw = dict(negative_prompt=%r, seed=%d, progress=False, image=image)
if pipe.plan.mesh.degrees['dp'] > 1:
    for i, video in pipe.run_many([%r, %r], **kw):
        np.save(out + f'.{i}.npy', video.frames)
else:
    video = pipe.run(prompt=%r, **kw)
    assert (video is None) == (os.environ['RANK'] != '0')
    if video is not None:
        np.save(out + '.0.npy', video.frames)
pipe.close()
""" % (NEGATIVE, SEED, PROMPT, SECOND_PROMPT, PROMPT)
_REFERENCES: dict[tuple, np.ndarray] = {}


def _image() -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (144, 256, 3), dtype=np.uint8)


def _one_rank(recipe: str, overrides: list[str], prompt: str, tmp_path: Path) -> np.ndarray:
    key = (recipe, tuple(overrides), prompt)
    if key not in _REFERENCES:
        plan = tmp_path / "one_rank.plan.json"
        compiled = compile_recipe(RECIPES / f"{recipe}.toml", overrides)
        plan.write_text(pretty_json(compiled.model_dump(mode="json", by_alias=True)))
        pipe = telefuser.load_plan(str(plan))
        image = _image() if "i2v" in recipe else None
        _REFERENCES[key] = pipe.run(prompt=prompt, negative_prompt=NEGATIVE, seed=SEED, image=image,
                                    progress=False).frames
    return _REFERENCES[key]


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


@pytest.mark.parametrize("case", list(CASES))
def test_several_ranks_give_the_one_rank_frames(case, tmp_path, monkeypatch) -> None:
    from telefuser.distributed.launch import run_local_ranks

    recipe, ranks, overrides, reference_overrides = CASES[case]
    compiled = compile_recipe(RECIPES / f"{recipe}.toml", [f"target.num_devices={ranks}", *overrides])
    dit = compiled.placement_of("dit")
    assert dit.parallelized and compiled.mesh.world_size == ranks
    assert dit.sharded == compiled.placement_of("text_encoder").sharded == ("fsdp" in case)
    plan = tmp_path / "plan.json"
    plan.write_text(pretty_json(compiled.model_dump(mode="json", by_alias=True)))
    args = [sys.executable, "-c", DRIVER, str(plan), str(tmp_path / "frames")]
    if "i2v" in recipe:
        np.save(tmp_path / "image.npy", _image())
        args.append(str(tmp_path / "image.npy"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert run_local_ranks(args, ranks) == 0
    _close(np.load(tmp_path / "frames.0.npy"), _one_rank(recipe, reference_overrides, PROMPT, tmp_path))
    if case == "dp2":  # the second prompt, made by replica 1's lead
        second = _one_rank(recipe, reference_overrides, SECOND_PROMPT, tmp_path)
        _close(np.load(tmp_path / "frames.1.npy"), second)
    if case == "ring2_vae_parallel":  # the tiles are a different picture from the untiled decode: a real check
        untiled = _one_rank(recipe, [], PROMPT, tmp_path).astype(np.int16)
        assert np.abs(untiled - np.load(tmp_path / "frames.0.npy")).max() > 1
