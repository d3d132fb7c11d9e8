"""Layer 3 parameters: defaults, allowed values, the resolution table, and the negative-prompt fallback."""

from __future__ import annotations

import pytest

from telefuser.errors import ParameterError
from telefuser.runtime.io.params import check_prompts, check_text, resolve_parameters
from telefuser.schema.plan import Plan
from telefuser.schema.resolution import RESOLUTION_TABLE, frame_size

# The documented table (docs/runtime.md): resolution -> aspect ratio -> (width, height).
DOCUMENTED = {
    "144p": {"16:9": (256, 144), "9:16": (144, 256), "1:1": (192, 192), "4:3": (192, 144), "3:4": (144, 192)},
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (624, 624), "4:3": (640, 480), "3:4": (480, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960), "4:3": (1088, 816), "3:4": (816, 1088)},
    # Wan2.2 TI2V-5B's 720p (Wan2.2 VAE 16x x patch 2: every side a multiple of 32)
    "704p": {"16:9": (1280, 704), "9:16": (704, 1280), "1:1": (928, 928), "4:3": (1024, 768), "3:4": (768, 1024)},
    # HunyuanVideo-1.5's SR target (its own buckets there); 1080 rounded up to a multiple of 16
    "1080p": {"16:9": (1920, 1088), "9:16": (1088, 1920), "1:1": (1440, 1440), "4:3": (1664, 1248),
              "3:4": (1248, 1664)},
}


def layer3_plan(frame_sizes=None, negative_default="", layer2_negative="") -> Plan:
    """A plan whose only meaningful parts are Layer 3 and Layer 2's negative prompt."""
    if frame_sizes is None:
        frame_sizes = {r: {a: list(frame_size(r, a)) for a in ("16:9", "1:1")} for r in ("144p", "480p")}
    return Plan.model_validate({
        "telefuser_version": "0", "plan_hash": "0" * 64, "timestamp": "now",
        "recipe": {"name": "t", "path": "t.toml", "source_sha256": "0" * 64},
        "pipeline_type": "wan_t2v", "device": "cpu",
        "target": {"device": "cpu", "memory_bytes": 0, "num_devices": 1, "packages": [], "described_by": "recipe"},
        "torch_dtype": "float32",
        "layer1_model_definition": {"models": []},
        "layer2_inference_config": {"negative_prompt": layer2_negative},
        "layer3_user_interface": {
            "parameters": {
                "prompt": {"type": "string", "required": True},
                "negative_prompt": {"type": "string", "default": negative_default},
                "seed": {"type": "integer", "default": 42, "minimum": 0, "maximum": 1000},
                "resolution": {"type": "choice", "default": "144p", "choices": ["144p", "480p"]},
                "aspect_ratio": {"type": "choice", "default": "16:9", "choices": ["16:9", "1:1"]},
            },
            "frame_sizes": frame_sizes,
        },
        "dispatch": [],
        "mesh": {"world_size": 1, "order": [], "degrees": {}, "ranks": [], "groups": {}},
        "memory": {"peak_bytes": 0, "capacity_bytes": 0, "breakdown": {}, "at": {}},
        "placement": [],
        "stages": [],
    })


def test_resolution_table_is_the_documented_one():
    assert {r.value: {a.value: wh for a, wh in t.items()} for r, t in RESOLUTION_TABLE.items()} == DOCUMENTED
    for table in DOCUMENTED.values():
        for width, height in table.values():
            assert width % 16 == 0 and height % 16 == 0  # VAE stride 8 x DiT patch 2


def test_defaults_fill_in_and_map_to_frame_size():
    p = resolve_parameters(layer3_plan(), prompt="a fox")
    assert (p.seed, p.resolution, p.aspect_ratio, p.width, p.height) == (42, "144p", "16:9", 256, 144)
    p = resolve_parameters(layer3_plan(), prompt="a fox", resolution="480p", aspect_ratio="16:9", seed=7)
    assert (p.width, p.height, p.seed) == (832, 480, 7)


@pytest.mark.parametrize(
    "given, needle",
    [
        ({"resolution": "720p"}, "choices are 144p, 480p"),
        ({"aspect_ratio": "9:16"}, "choices are 16:9, 1:1"),
        ({"seed": 1001}, "outside the plan's range [0, 1000]"),
        ({"seed": "7"}, "must be an integer"),
        ({"seed": True}, "must be an integer"),
        ({"prompt": None}, "requires prompt"),
        ({"image": "x.png"}, "does not take parameter(s) image"),
    ],
)
def test_values_outside_the_plan_are_refused(given, needle):
    with pytest.raises(ParameterError, match=None) as info:
        resolve_parameters(layer3_plan(), **{"prompt": "a fox", **given})
    assert needle in str(info.value)


def test_negative_prompt_falls_back_to_layer2_only_when_not_given():
    plan = layer3_plan(layer2_negative="blurry")
    assert resolve_parameters(plan, prompt="x").negative_prompt == "blurry"
    assert resolve_parameters(plan, prompt="x", negative_prompt="").negative_prompt == ""
    assert resolve_parameters(plan, prompt="x", negative_prompt="dark").negative_prompt == "dark"
    assert resolve_parameters(layer3_plan(negative_default="grey", layer2_negative="blurry"), prompt="x").negative_prompt == "grey"


def test_the_plan_recorded_frame_size_is_the_one_run():
    """The compiler decides each choice's size (the table, or a family's own: HunyuanVideo-1.5's buckets) and records
    it; the runtime runs that, and the table only for a choice the plan records none of."""
    plan = layer3_plan(frame_sizes={"144p": {"16:9": [320, 144]}})
    p = resolve_parameters(plan, prompt="x")
    assert (p.width, p.height) == (320, 144)
    p = resolve_parameters(layer3_plan(frame_sizes={"144p": {}}), prompt="x")
    assert (p.width, p.height) == (256, 144)


@pytest.mark.parametrize("given, message", [
    ({"prompt": "a fox\x00"}, "--prompt holds a NUL character (\\x00, at position 5), which no prompt can contain; "
                               "remove it."),
    ({"prompt": "x", "negative_prompt": "y" * 10_001},
     "--negative-prompt is 10,001 characters long; the text encoder reads only its first 512 tokens (layer2.text_len; "
     "a few thousand characters at most), so at most 10,000 characters are accepted: shorten it."),
    ({"prompt": "bad \udcff"}, "--prompt is not UTF-8 text (undecodable bytes at character 4); pass the text in UTF-8."),
    ({"prompt": " \n\t"}, '--prompt is empty; describe the video, e.g. --prompt "a red fox running through fresh snow".'),
])
def test_prompt_checks_are_one_rule_with_telefuser_runs_messages(given, message):
    """`check_prompts`: what telefuser-run and telefuser-serve both refuse in a prompt, with one message each."""
    with pytest.raises(ParameterError) as info:
        check_prompts(layer3_plan(), given)
    assert str(info.value) == message


def test_prompt_checks_pass_what_they_do_not_judge():
    plan = layer3_plan()
    check_prompts(plan, {"prompt": "x" * 10_000, "negative_prompt": ""})  # at the limit; an empty negative prompt
    check_prompts(plan, {"prompt": None, "seed": 3})  # not given: resolve_parameters says it is required
    check_prompts(plan, {"prompt": 7})  # not text: resolve_parameters says it must be a string
    data = plan.model_dump(mode="json", by_alias=True)
    data["layer3_user_interface"]["parameters"]["prompt"]["required"] = False
    optional = Plan.model_validate(data)
    check_prompts(optional, {"prompt": ""})  # an empty prompt is refused only where the plan requires one
    check_text("-o/--output", "out/\udcff.mp4", path=True)  # paths: only a NUL is refused
    with pytest.raises(ParameterError, match="which no path can contain"):
        check_text("-o/--output", "a\x00.mp4", path=True)
