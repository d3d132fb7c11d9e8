"""User parameters (the plan's Layer 3): fill defaults, refuse values the plan does not allow."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from telefuser.errors import ParameterError, PlanError
from telefuser.schema.buckets import closest_frame_size
from telefuser.schema.enums import AspectRatio
from telefuser.schema.plan import Plan, UserParameter
from telefuser.schema.resolution import frame_size

if TYPE_CHECKING:
    from .image import ConditioningImage

# A prompt longer than this is refused: the text encoder reads at most text_len tokens (512 for Wan,
# about 2,000 characters of English), so such a prompt is a mistake (a file pasted in?), not a prompt.
MAX_PROMPT_CHARS = 10_000
PROMPT_PARAMETERS = ("prompt", "negative_prompt")


@dataclass(frozen=True)
class RunParameters:
    prompt: str
    negative_prompt: str
    seed: int
    resolution: str
    aspect_ratio: str
    width: int
    height: int
    image: Optional["ConditioningImage"] = None  # image-to-video: the checked conditioning image


def check_text(option: str, value: Optional[str], path: bool = False, text_len: int = 512) -> None:
    """Values no prompt or path can be: a NUL character, text that is not UTF-8, a prompt of a book's length.
    `option` names the value in the message (telefuser-run's option; the service uses the same names)."""
    if value is None:
        return
    if "\x00" in value:
        raise ParameterError(f"{option} holds a NUL character (\\x00, at position {value.index(chr(0))}), which no "
                             f"{'path' if path else 'prompt'} can contain; remove it.")
    if path:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParameterError(f"{option} is not UTF-8 text (undecodable bytes at character {exc.start}); pass the "
                             "text in UTF-8.") from exc
    if len(value) > MAX_PROMPT_CHARS:
        raise ParameterError(f"{option} is {len(value):,} characters long; the text encoder reads only its first "
                             f"{text_len} tokens (layer2.text_len; a few thousand characters at most), so at most "
                             f"{MAX_PROMPT_CHARS:,} characters are accepted: shorten it.")


def check_prompts(plan: Plan, given: Mapping[str, Any]) -> None:
    """The checks telefuser-run and telefuser-serve make on the given prompt and negative prompt (text values
    only; `resolve_parameters` refuses other types), and a required prompt that is empty or only white space."""
    specs = plan.layer3_user_interface.parameters
    for name in PROMPT_PARAMETERS:
        if name in specs and isinstance(given.get(name), str):
            check_text("--" + name.replace("_", "-"), given[name], text_len=plan.layer2_inference_config.text_len)
    prompt = given.get("prompt")
    if "prompt" in specs and specs["prompt"].required and isinstance(prompt, str) and not prompt.strip():
        raise ParameterError('--prompt is empty; describe the video, e.g. --prompt "a red fox running through '
                             'fresh snow".')


def _check(name: str, spec: UserParameter, value: Any) -> Any:
    option = "--" + name.replace("_", "-")
    if spec.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterError(f"{name} must be an integer, got {value!r}; pass e.g. {option} {spec.default}.")
        low = spec.minimum if spec.minimum is not None else value
        high = spec.maximum if spec.maximum is not None else value
        if not low <= value <= high:
            raise ParameterError(f"{name} {value} is outside the plan's range [{low}, {high}]; pick a value inside it.")
    elif spec.type == "choice":
        if str(value) not in (spec.choices or []):
            raise ParameterError(
                f"{name} {value!r} is not allowed by this plan; its choices are {', '.join(spec.choices or [])}. "
                f"Pick one of them with {option}, or add it to the recipe's layer3.{name}.choices and recompile."
            )
        value = str(value)
    elif not isinstance(value, str):
        raise ParameterError(f"{name} must be a string, got {type(value).__name__} {value!r}.")
    return value


def image_not_taken(plan: Plan, image: Any, unknown: list[str] | None = None) -> ParameterError:
    """The error for an image given to a plan without an image parameter (a text-to-video plan)."""
    shown = repr(str(image)) if isinstance(image, (str, os.PathLike)) else f"(a {type(image).__name__})"
    return ParameterError(
        f"this plan does not take parameter(s) {', '.join(unknown or ['image'])}: it is a {plan.pipeline_type} "
        f"(text-to-video) plan, so image {shown} would be ignored; drop --image, or run an image-to-video plan "
        "(compiled from a recipe with layer1.pipeline = \"wan_i2v\", e.g. recipes/tiny_i2v.toml, or a \"wan_ti2v\" "
        "one with a [layer3.image], e.g. recipes/tiny_ti2v.toml)."
    )


def resolve_parameters(plan: Plan, **given: Any) -> RunParameters:
    """Merge the given values (None = not given) with the plan's defaults and check each one."""
    specs = plan.layer3_user_interface.parameters
    unknown = sorted(k for k, v in given.items() if v is not None and k not in specs)
    if "image" in unknown:
        raise image_not_taken(plan, given["image"], unknown)
    if unknown:
        raise ParameterError(
            f"this plan does not take parameter(s) {', '.join(unknown)}; it takes {', '.join(sorted(specs))}."
        )
    values: dict[str, Any] = {}
    for name, spec in specs.items():
        value: Optional[Any] = given.get(name)
        if value is None:
            if name == "image" and spec.required:
                raise ParameterError("this image-to-video plan needs the video's first frame: pass --image PATH (a PNG, "
                                     "JPEG or WebP file) on the command line, or image=... (a path, a PIL image or an "
                                     "RGB uint8 numpy array) in Python.")
            if spec.required:
                raise ParameterError(f"the plan requires {name}; pass it (--{name.replace('_', '-')} on the command line).")
            value = spec.default
        if name == "image" and spec.type == "path":
            from .image import as_image

            values[name] = as_image(value) if value is not None else None
            continue
        values[name] = _check(name, spec, value) if value is not None else None
    negative_prompt = values.get("negative_prompt") or ""
    if given.get("negative_prompt") is None and not negative_prompt:
        # Layer 2's negative prompt is the algorithm's default when Layer 3 offers none.
        negative_prompt = plan.layer2_inference_config.negative_prompt
    if values["aspect_ratio"] == AspectRatio.AUTO.value:
        width, height = image_frame_size(plan, values["resolution"], values.get("image"))
    else:
        width, height = planned_frame_size(plan, values["resolution"], values["aspect_ratio"])
    return RunParameters(
        prompt=values["prompt"] or "",
        negative_prompt=negative_prompt,
        seed=values["seed"],
        resolution=values["resolution"],
        aspect_ratio=values["aspect_ratio"],
        width=width,
        height=height,
        image=values.get("image"),
    )


def planned_frame_size(plan: Plan, resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(width, height) the plan recorded for this choice (the compiler decides it: the resolution table, or a
    family's own sizes such as HunyuanVideo-1.5's buckets); the table for a choice the plan records none of."""
    recorded = plan.layer3_user_interface.frame_sizes.get(resolution, {}).get(aspect_ratio)
    if recorded is not None:
        return int(recorded[0]), int(recorded[1])
    return frame_size(resolution, aspect_ratio)


def image_frame_size(plan: Plan, resolution: str, image: Optional["ConditioningImage"]) -> tuple[int, int]:
    """Aspect ratio "auto": the (width, height) among the plan's candidates for this resolution whose aspect ratio is
    closest to the reference image's (HunyuanVideo-1.5's I2V rule, `closest_frame_size`); only sizes the compiler
    recorded (and sized the memory for) can come out."""
    candidates = plan.layer3_user_interface.image_frame_sizes.get(resolution)
    if not candidates:
        raise PlanError(f'this plan offers aspect ratio "auto" but records no candidate frame sizes for resolution '
                        f"{resolution} (layer3_user_interface.image_frame_sizes); recompile it with this TeleFuser.")
    if image is None:
        raise ParameterError('aspect ratio "auto" takes the frame from the reference image, and none was given: pass '
                             '--image PATH, or choose a ratio such as --aspect-ratio 16:9.')
    return closest_frame_size(candidates, *image.size)
