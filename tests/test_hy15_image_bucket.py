"""HunyuanVideo-1.5 image-to-video with aspect ratio "auto": the frame is the bucket whose aspect ratio is closest to
the reference image's (tencent/HunyuanVideo-1.5 `hyvideo/pipelines/hunyuan_video_pipeline.py`,
`get_closest_resolution_given_original_size`: the resolution's `generate_crop_size_list` buckets, their h / w ratios
rounded to 5 decimals, `get_closest_ratio` = the argmin of |ratio - image h / w|, the first on a tie).

The compiler records every candidate (`layer3_user_interface.image_frame_sizes`), checks each against the VAE and
the patch and sizes the memory estimate on the largest; the runtime picks among them (`resolve_parameters`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.errors import ParameterError, PlanError, RecipeError
from telefuser.runtime.io.params import resolve_parameters
from telefuser.schema.buckets import closest_frame_size, image_buckets
from telefuser.schema.canonical import pretty_json
from telefuser.schema.resolution import RESOLUTION_TABLE, family_frame_size, frame_candidates

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
I2V = "hunyuan_video15_i2v"

# (resolution, image width, image height) -> the frame (width, height), worked out by hand from the published list
BUCKET_CASES = [
    ("480p", 1920, 1080, (848, 480)),   # 16:9 photo: 480 / 848 = 0.56604, the closest of 0.5625's neighbours
    ("480p", 1080, 1920, (480, 848)),   # 9:16 portrait
    ("480p", 1000, 1000, (640, 640)),   # square
    ("480p", 1600, 1200, (720, 544)),   # 4:3: 544 / 720 = 0.75556
    ("480p", 1200, 1600, (544, 720)),   # 3:4
    ("480p", 3000, 2000, (768, 512)),   # 3:2: exactly 0.66667
    ("480p", 300, 400, (544, 720)),     # a small portrait: only the ratio counts
    ("480p", 4000, 500, (1280, 320)),   # 8:1 panorama: the widest bucket (aspect at most 4)
    ("480p", 500, 4000, (320, 1280)),   # 1:8: the tallest
    ("720p", 1920, 1080, (1280, 720)),
    ("720p", 1080, 1920, (720, 1280)),
    ("720p", 1024, 1024, (960, 960)),
    ("144p", 1920, 1080, (256, 144)),   # no published bucket: the table's row (tiny recipes)
    ("144p", 300, 400, (144, 192)),
    ("144p", 500, 500, (192, 192)),
]


@pytest.mark.parametrize("resolution, width, height, frame", BUCKET_CASES)
def test_the_bucket_rule_against_a_hand_written_table(resolution, width, height, frame) -> None:
    candidates = frame_candidates(I2V, resolution, "auto")
    assert closest_frame_size(candidates, width, height) == frame
    assert frame in candidates


def test_the_candidates_are_the_published_bucket_list() -> None:
    buckets = image_buckets("480p")
    assert frame_candidates(I2V, "480p", "auto") == buckets
    assert len(buckets) == 121 and buckets[0] == (320, 1280) and buckets[-1] == (1280, 320)
    assert max(w * h for w, h in buckets) == 640 * 640  # every bucket holds at most base_size^2 pixels
    assert all(w % 16 == 0 and h % 16 == 0 and max(w, h) <= 4 * min(w, h) for w, h in buckets)
    # an image of a fixed ratio gets that ratio's T2V bucket (the two picks are the same rule)
    for ratio in ("16:9", "9:16", "1:1", "4:3", "3:4"):
        w, h = (int(v) for v in ratio.split(":"))
        for res in ("480p", "720p"):
            assert closest_frame_size(frame_candidates(I2V, res, "auto"), w * 100, h * 100) == \
                family_frame_size(I2V, res, ratio)
    # no published bucket: the table's row, in the table's order; a fixed ratio is its one size
    assert frame_candidates(I2V, "144p", "auto") == list(RESOLUTION_TABLE["144p"].values())
    assert frame_candidates(I2V, "480p", "16:9") == [(848, 480)]
    # a tie goes to the first candidate
    assert closest_frame_size([(256, 144), (512, 288)], 16, 9) == (256, 144)
    with pytest.raises(ValueError, match="auto"):
        family_frame_size(I2V, "480p", "auto")


def _plan_file(tmp_path, plan) -> str:
    path = tmp_path / f"{plan.recipe.name}.plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return str(path)


def test_the_tiny_plan_records_every_candidate(tmp_path) -> None:
    plan = compile_recipe(RECIPES / "tiny_hy15_i2v.toml")
    l3 = plan.layer3_user_interface
    assert l3.parameters["aspect_ratio"].default == "auto"
    assert l3.parameters["aspect_ratio"].choices == ["auto", "16:9", "9:16", "1:1"]
    assert l3.image_frame_sizes == {"144p": [[256, 144], [144, 256], [192, 192], [192, 144], [144, 192]]}
    assert "auto" not in l3.frame_sizes["144p"]  # the fixed ratios keep their one size each
    assert plan.memory.at["width"] * plan.memory.at["height"] == 192 * 192  # the largest candidate
    from telefuser.compiler.explain import explain

    text = explain(plan)
    assert "144p auto: the size of the aspect ratio closest to the image's, of 5: 256x144" in text
    # T2V recipes, and fixed ratios, record none
    assert compile_recipe(RECIPES / "tiny_hy15.toml").layer3_user_interface.image_frame_sizes == {}


def test_the_shipped_i2v_recipe_sizes_its_memory_on_the_largest_bucket(tmp_path, monkeypatch) -> None:
    from bench.hy15_files import write_hunyuan15_root

    write_hunyuan15_root(tmp_path)
    monkeypatch.setenv("TELEFUSER_MODEL_ROOT", str(tmp_path))
    recipe = RECIPES / "hunyuan15_i2v_480p_step_distilled.toml"
    auto = compile_recipe(recipe)
    assert auto.layer3_user_interface.parameters["aspect_ratio"].default == "auto"
    assert auto.layer3_user_interface.image_frame_sizes["480p"] == [list(s) for s in image_buckets("480p")]
    assert auto.memory.at["aspect_ratio"] == "auto" and auto.memory.at["width"] * auto.memory.at["height"] == 409600
    square = compile_recipe(recipe, ["layer3.aspect_ratio.default=1:1", 'layer3.aspect_ratio.choices=["1:1"]'])
    assert auto.memory.peak_bytes >= square.memory.peak_bytes


def _pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_tiny_auto_runs_portrait_and_landscape_images_at_their_buckets(tmp_path) -> None:
    """End to end on the CPU: a portrait image makes a 144x192 video, a 16:9 one a 256x144 video; the CLI's --image
    does the same, and "auto" equals the fixed ratio it picks (the same frame, bit for bit)."""
    from PIL import Image

    from telefuser.cli.run import main as run_main

    torch.set_num_threads(2)
    path = _plan_file(tmp_path, compile_recipe(RECIPES / "tiny_hy15_i2v.toml"))
    pipe = telefuser.load_plan(path)
    portrait = pipe.run(prompt="a cat", seed=3, image=_pixels(400, 300, 1), progress=False)
    assert portrait.frames.shape == (5, 192, 144, 3) and portrait.frames.std() > 1.0
    landscape_image = _pixels(1080, 1920, 2)
    landscape = pipe.run(prompt="a cat", seed=3, image=landscape_image, progress=False)
    assert landscape.frames.shape == (5, 144, 256, 3)
    fixed = pipe.run(prompt="a cat", seed=3, image=landscape_image, aspect_ratio="16:9", progress=False)
    assert np.array_equal(fixed.frames, landscape.frames)
    image = tmp_path / "portrait.png"
    Image.fromarray(_pixels(1920, 1080, 4)).save(image)
    out = tmp_path / "portrait.mp4"
    assert run_main([path, "--prompt", "a cat", "--image", str(image), "-o", str(out), "--no-progress"]) == 0
    import imageio.v3 as iio

    assert iio.imread(out).shape == (5, 256, 144, 3)


def test_the_runtime_picks_only_recorded_candidates() -> None:
    plan = compile_recipe(RECIPES / "tiny_hy15_i2v.toml")
    p = resolve_parameters(plan, prompt="x", image=_pixels(300, 400, 0))
    assert (p.aspect_ratio, p.width, p.height) == ("auto", 192, 144)
    edited = plan.model_copy(update={"layer3_user_interface": plan.layer3_user_interface.model_copy(
        update={"image_frame_sizes": {"144p": [[144, 256], [256, 144]]}})})
    p = resolve_parameters(edited, prompt="x", image=_pixels(300, 400, 0))  # 4:3: of these, 256x144 is closest
    assert (p.width, p.height) == (256, 144)
    bare = plan.model_copy(update={"layer3_user_interface": plan.layer3_user_interface.model_copy(
        update={"image_frame_sizes": {}})})
    with pytest.raises(PlanError, match="recompile"):
        resolve_parameters(bare, prompt="x", image=_pixels(300, 400, 0))
    with pytest.raises(ParameterError, match="--image"):
        resolve_parameters(plan, prompt="x")


@pytest.mark.parametrize("recipe, overrides, needle", [
    ("tiny_hy15.toml", ['layer3.aspect_ratio.choices=["auto", "16:9"]'], "needs an image-to-video pipeline"),
    ("tiny_hy15.toml", ["layer3.aspect_ratio.default=auto", 'layer3.aspect_ratio.choices=["auto"]'],
     "not hunyuan_video15_t2v"),
    ("tiny.toml", ['layer3.aspect_ratio.choices=["16:9", "auto"]'], "not wan_t2v"),
    ("tiny_ti2v.toml", ['layer3.aspect_ratio.choices=["1:1", "auto"]'], "layer3.image.required = true"),
])
def test_auto_without_an_image_to_video_pipeline_is_refused(recipe, overrides, needle) -> None:
    with pytest.raises(RecipeError) as info:
        compile_recipe(RECIPES / recipe, overrides)
    assert info.value.exit_code == 2
    message = " ".join(str(info.value).split())
    assert 'layer3.aspect_ratio "auto"' in message and needle in message, message


def test_the_compile_cli_refuses_auto_on_text_to_video_with_exit_2(tmp_path, capsys) -> None:
    from telefuser.cli.compile import main as compile_main

    code = compile_main([str(RECIPES / "tiny_hy15.toml"), "--set", "layer3.aspect_ratio.default=auto",
                         "--set", 'layer3.aspect_ratio.choices=["auto"]', "-o", str(tmp_path / "p.json")])
    assert code == 2 and not (tmp_path / "p.json").exists()
    assert "image-to-video pipeline" in " ".join(capsys.readouterr().err.split())


def test_python_api_layer3_auto_offers_the_fixed_ratios_too() -> None:
    from telefuser.core.config import AspectRatio, AspectRatioParam

    param = AspectRatioParam(default="auto")
    assert param.choices[0] == AspectRatio.AUTO and AspectRatio.R16_9 in param.choices
    assert AspectRatio.AUTO not in AspectRatioParam().choices  # Wan's and T2V's default choices are unchanged


def test_auto_is_shared_with_wan_i2v_over_the_table_row() -> None:
    """Not HunyuanVideo-1.5's buckets: a Wan image-to-video plan offering "auto" picks among the table's row."""
    plan = compile_recipe(RECIPES / "tiny_i2v.toml", ["layer3.aspect_ratio.default=auto",
                                                      'layer3.aspect_ratio.choices=["auto", "16:9"]'])
    assert plan.layer3_user_interface.image_frame_sizes["480p"] == [list(s) for s in RESOLUTION_TABLE["480p"].values()]
    assert (plan.memory.at["width"], plan.memory.at["height"]) == (832, 480)
    p = resolve_parameters(plan, prompt="x", image=_pixels(400, 300, 0))
    assert (p.width, p.height) == (144, 192)
