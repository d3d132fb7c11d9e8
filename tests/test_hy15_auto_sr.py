"""HunyuanVideo-1.5 image-to-video with aspect ratio "auto" and the super-resolution stage (recipes/tiny_hy15_i2v_sr.toml,
compiler/hunyuan15_sr.py `sr_sizes`, runtime/stages/base.py `sr_frame`).

The reference image picks the base bucket (Tencent's I2V rule, tests/test_hy15_image_bucket.py); the SR frame is the
target resolution's bucket closest to that base frame's aspect ratio (Tencent's SR BucketMap, `schema.buckets
.sr_bucket_size`). The compiler records the SR frame of every base frame a run may generate in the SR stages'
`frame_sizes` ("WxH" of the base frame -> [width, height]) and sizes the memory on the largest; the runtime only looks
the run's base frame up there. The expected sizes below are worked out by hand from the published bucket lists
(tiny: 144p has no bucket, so its candidates are the table's five sizes; SR target 480p)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import telefuser
from telefuser.cli.compile import main as compile_main
from telefuser.cli.run import main as run_main
from telefuser.compiler import compile_recipe
from telefuser.errors import PlanError
from telefuser.schema.canonical import plan_hash, pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE = RECIPES / "tiny_hy15_i2v_sr.toml"
SR_STAGES = ("load_image_sr", "encode_image_sr", "upsample_latent")
# tiny: base 144p candidate -> the 480p bucket of the closest aspect ratio
TINY_SR = {"256x144": [848, 480],   # 16:9: 848 / 480 = 1.767, the closest 480p bucket to 1.778
           "144x256": [480, 848],   # 9:16
           "192x192": [640, 640],   # 1:1
           "192x144": [720, 544],   # 4:3: 720 / 544 = 1.324
           "144x192": [544, 720]}   # 3:4
PROMPT, SEED = "a cat turns its head", 5


def _pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _plan_file(tmp_path: Path, plan) -> str:
    path = tmp_path / "auto_sr.plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return str(path)


def test_tiny_plan_records_an_sr_frame_per_candidate_and_sizes_memory_on_the_largest() -> None:
    plan = compile_recipe(RECIPE)
    l3 = plan.layer3_user_interface
    assert l3.parameters["aspect_ratio"].default == "auto"
    candidates = [tuple(s) for s in l3.image_frame_sizes["144p"]]
    assert candidates == [(256, 144), (144, 256), (192, 192), (192, 144), (144, 192)]
    st = {s.name: s for s in plan.stages}
    for name in SR_STAGES:
        assert st[name].params["frame_sizes"] == TINY_SR, name
    # every base frame a run may generate (the candidates and the fixed ratios' frames) has its SR frame
    fixed = [tuple(s) for s in l3.frame_sizes["144p"].values()]
    assert {f"{w}x{h}" for w, h in candidates + fixed} == set(TINY_SR)
    # the SR DiT's activations at the largest SR frame, 640x640 (1600 latent pixels), against a 16:9-only plan's
    # 848x480 (53 x 30 = 1590): the estimate is linear in the tokens on one rank
    only = compile_recipe(RECIPE, ["layer3.aspect_ratio.default=16:9", 'layer3.aspect_ratio.choices=["16:9"]'])
    assert next(s for s in only.stages if s.name == "upsample_latent").params["frame_sizes"] == {"256x144": [848, 480]}
    auto_act, fixed_act = plan.memory.breakdown["activations.dit_sr"], only.memory.breakdown["activations.dit_sr"]
    assert auto_act * 1590 == fixed_act * 1600
    assert plan.memory.breakdown["activations.vae_encode_sr"] == 10 * 4 * 640 * 640 * 4 + 3 * 640 * 640 * 4


def test_shipped_480p_i2v_sr_recipe_uses_auto_with_the_720p_bucket_of_each_candidate() -> None:
    plan = compile_recipe(RECIPES / "hunyuan15_i2v_480p_sr_720p.toml", inspect_weights=False)
    assert plan.layer3_user_interface.parameters["aspect_ratio"].default == "auto"
    candidates = plan.layer3_user_interface.image_frame_sizes["480p"]
    assert len(candidates) == 121
    sizes = next(s for s in plan.stages if s.name == "upsample_latent").params["frame_sizes"]
    assert set(sizes) == {f"{w}x{h}" for w, h in candidates}
    for name in SR_STAGES:
        assert next(s for s in plan.stages if s.name == name).params["frame_sizes"] == sizes
    # Tencent's BucketMap 480p -> 720p, by hand from the two bucket lists
    assert sizes["848x480"] == [1280, 720] and sizes["480x848"] == [720, 1280] and sizes["640x640"] == [960, 960]
    assert sizes["720x544"] == [1104, 832] and sizes["768x512"] == [1168, 784] and sizes["1280x320"] == [1920, 480]


def test_auto_sr_runs_portrait_and_landscape_at_the_sr_frame_of_the_picked_bucket(tmp_path) -> None:
    """End to end on the CPU through telefuser-run: a 9:16 portrait picks 144x256 -> SR 480x848, a 4:3 landscape
    192x144 -> SR 720x544; "auto" equals the fixed ratio it picks, bit for bit."""
    import imageio.v3 as iio
    from PIL import Image

    torch.set_num_threads(2)
    path = _plan_file(tmp_path, compile_recipe(RECIPE))
    for name, (h, w), expected in (("portrait", (480, 270), (480, 848)), ("landscape", (300, 400), (720, 544))):
        image = tmp_path / f"{name}.png"
        Image.fromarray(_pixels(h, w, 1)).save(image)
        out = tmp_path / f"{name}.mp4"
        assert run_main([path, "--prompt", PROMPT, "--seed", str(SEED), "--image", str(image), "-o", str(out),
                         "--no-progress"]) == 0
        frames = iio.imread(out)
        assert frames.shape[1:] == (expected[1], expected[0], 3), name
    pipe = telefuser.load_plan(path)
    portrait = _pixels(480, 270, 2)
    auto = pipe.run(prompt=PROMPT, seed=SEED, image=portrait, progress=False)
    fixed = pipe.run(prompt=PROMPT, seed=SEED, image=portrait, aspect_ratio="9:16", progress=False)
    assert auto.frames.shape == (1, 848, 480, 3) and auto.frames.std() > 1.0
    assert np.array_equal(auto.frames, fixed.frames)


def test_the_runtime_reads_only_recorded_sr_frames(tmp_path) -> None:
    """A plan whose SR stages lack the picked base frame is refused with "recompile" (the runtime computes no size)."""
    raw = compile_recipe(RECIPE).model_dump(mode="json", by_alias=True)
    for stage in raw["stages"]:  # a hand-edited plan: its SR stages lack the 4:3 candidate's SR frame
        if stage["name"] in SR_STAGES:
            del stage["params"]["frame_sizes"]["192x144"]
    raw["plan_hash"] = plan_hash(raw)
    path = tmp_path / "edited.json"
    path.write_text(pretty_json(raw))
    pipe = telefuser.load_plan(str(path))
    with pytest.raises(PlanError, match="no SR frame for this run's base frame 192x144.*recompile"):
        pipe.run(prompt=PROMPT, seed=SEED, image=_pixels(300, 400, 3), progress=False)


def test_an_sr_target_not_larger_than_a_candidate_exits_2(tmp_path, capsys) -> None:
    code = compile_main([str(RECIPE), "--set", "layer2.sr_config.target_resolution=144p", "-o",
                         str(tmp_path / "p.json")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err and not (tmp_path / "p.json").exists()
    assert "target_resolution = '144p' is not larger than layer3 resolution 144p at auto" in err, err
