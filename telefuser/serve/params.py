"""A request to the service -> the values `Pipeline.run` takes, checked against the plan's Layer 3.

The request model is built from `plan.layer3_user_interface` (a field per parameter, with its type, default,
choices and range), plus OpenAI's video fields: `size` ("WxH", one of the frame sizes the plan offers: it
stands for a resolution x aspect-ratio pair), `seconds` (what the plan fixed: num_frames / fps) and `model`
(the plan's name). Values are checked by the runtime's own `check_prompts` and `resolve_parameters`, so a bad
value gets the message `telefuser-run` prints for it; the model only documents (`/openapi.json`, `/docs`, the
page at `/`).
Nothing the plan fixed (steps, frames, cfg, ...) is a field, so no request can change it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from telefuser.errors import ParameterError
from telefuser.runtime.io.params import (MAX_PROMPT_CHARS, RunParameters, check_prompts, image_not_taken,
                                         resolve_parameters)
from telefuser.schema.plan import Plan

OPENAI_FIELDS = ("size", "seconds", "model")
SERVICE_FIELDS = ("retry_if_replica_dies",)  # how the service treats the job, not what it makes
IMAGE_FIELD = "input_reference"  # OpenAI's name for the image-to-video first frame


def plan_name(plan: Plan) -> str:
    """The `model` of every job: the recipe's name."""
    return plan.recipe.name


def plan_seconds(plan: Plan) -> str:
    """The clip length the plan fixed, as OpenAI's `seconds` string ("1.125" for 9 frames at 8 fps)."""
    l2 = plan.layer2_inference_config
    return f"{l2.num_frames / l2.fps:g}"


def offered_sizes(plan: Plan) -> dict[str, tuple[str, str]]:
    """"WxH" -> (resolution, aspect_ratio), for every pair of the plan's allowed choices."""
    specs = plan.layer3_user_interface.parameters
    sizes: dict[str, tuple[str, str]] = {}
    for resolution, ratios in plan.layer3_user_interface.frame_sizes.items():
        if "resolution" in specs and resolution not in (specs["resolution"].choices or [resolution]):
            continue
        for ratio, (width, height) in ratios.items():
            if "aspect_ratio" in specs and ratio not in (specs["aspect_ratio"].choices or [ratio]):
                continue
            sizes.setdefault(f"{width}x{height}", (resolution, ratio))
    return sizes


def default_size(plan: Plan) -> str:
    specs = plan.layer3_user_interface.parameters
    resolution = specs["resolution"].default if "resolution" in specs else None
    ratio = specs["aspect_ratio"].default if "aspect_ratio" in specs else None
    for size, pair in offered_sizes(plan).items():
        if pair == (resolution, ratio):
            return size
    return next(iter(offered_sizes(plan)), "")


def takes_image(plan: Plan) -> bool:
    return "image" in plan.layer3_user_interface.parameters


def request_model(plan: Plan, multipart: bool = False) -> type[BaseModel]:
    """The pydantic model of `POST /v1/videos` for this plan: its Layer 3 parameters and OpenAI's fields."""
    fields: dict[str, Any] = {}
    for name, spec in plan.layer3_user_interface.parameters.items():
        if name == "image":
            continue
        description = spec.description or name.replace("_", " ")
        if spec.type == "integer":
            annotation: Any = int
            extra = {"ge": spec.minimum, "le": spec.maximum}
        elif spec.type == "choice":
            annotation = Literal[tuple(spec.choices or [])]  # type: ignore[misc]
            extra = {}
        else:
            annotation = str
            extra = {"max_length": MAX_PROMPT_CHARS}
        if spec.required:
            fields[name] = (annotation, Field(..., description=description, **extra))
        else:
            if name == "negative_prompt" and not spec.default and plan.layer2_inference_config.negative_prompt:
                description += f" Default: the plan's ({plan.layer2_inference_config.negative_prompt!r})."
            fields[name] = (Optional[annotation], Field(spec.default if spec.default != "" else None,
                                                        description=description, **extra))
    sizes = list(offered_sizes(plan))
    if sizes:
        fields["size"] = (Optional[Literal[tuple(sizes)]], Field(  # type: ignore[misc]
            None, description=f"OpenAI's width x height: one of the sizes this plan offers ({', '.join(sizes)}); "
                              "it picks the resolution and aspect ratio (give either those or size)."))
    fields["seconds"] = (Optional[Literal[(plan_seconds(plan),)]], Field(  # type: ignore[misc]
        None, description=f"Fixed by the plan: {plan_seconds(plan)} s ({plan.layer2_inference_config.num_frames} "
                          f"frames at {plan.layer2_inference_config.fps} fps)."))
    fields["model"] = (Optional[Literal[(plan_name(plan),)]], Field(  # type: ignore[misc]
        None, description=f"This service runs the plan {plan_name(plan)!r} only."))
    fields["retry_if_replica_dies"] = (Optional[bool], Field(
        None, description="With Ray replicas: if the replica running this job dies, run it once more on another "
                          "(default: the job fails with error code replica_died)."))
    if multipart and takes_image(plan):
        spec = plan.layer3_user_interface.parameters["image"]
        fields[IMAGE_FIELD] = (bytes if spec.required else Optional[bytes], Field(
            ... if spec.required else None, json_schema_extra={"format": "binary"},
            description=spec.description or "The first frame (PNG, JPEG or WebP)."))
    suffix = "Multipart" if multipart else ""
    return create_model(f"VideoCreate{suffix}", __config__=ConfigDict(extra="forbid"), **fields)


@dataclass(frozen=True)
class JobRequest:
    """What the worker runs (`Pipeline.run(**values)`) and what the job object shows."""

    values: dict
    params: RunParameters
    size: str
    seconds: str
    prompt: str
    retry: bool = False  # run it again once if its replica dies (Ray)


def decode_image(data: bytes, option: str = IMAGE_FIELD):
    """An uploaded image, decoded in memory with the runtime's checks (`telefuser.runtime.io.image.decode`): a
    ConditioningImage, or a ParameterError; nothing is written."""
    from telefuser.runtime.io.image import HOW, decode

    what = f"{option} ({len(data):,} bytes uploaded)"
    if not data:
        raise ParameterError(f"{what} is empty; {HOW}.")
    return decode(io.BytesIO(data), what, "<uploaded input_reference>")


def resolve_request(plan: Plan, fields: dict[str, Any], image: Optional[bytes] = None,
                    from_form: bool = False) -> JobRequest:
    """Check one request (its body's fields; an uploaded image's bytes) against the plan; ParameterError with
    telefuser-run's message for anything the plan does not allow."""
    specs = plan.layer3_user_interface.parameters
    fields = dict(fields)
    if IMAGE_FIELD in fields:  # OpenAI's JSON form: {"image_url": ...} or {"file_id": ...}
        raise ParameterError(f"{IMAGE_FIELD} must be uploaded as a file in a multipart/form-data request (the "
                             "openai client does so when given a file); image URLs and file ids are not fetched.")
    if "image" in fields:
        raise ParameterError(f"send the first frame as the multipart file field {IMAGE_FIELD!r}, not as 'image'.")
    known = (*OPENAI_FIELDS, *SERVICE_FIELDS)
    unknown = sorted(k for k, v in fields.items() if v is not None and k not in specs and k not in known)
    if unknown:
        offered = sorted([*(n for n in specs if n != "image"), *known])
        raise ParameterError(f"this plan does not take parameter(s) {', '.join(unknown)}; it takes "
                             f"{', '.join(offered)}" + (f" and the file {IMAGE_FIELD}" if takes_image(plan) else "")
                             + ".")
    retry = fields.pop("retry_if_replica_dies", None)
    if isinstance(retry, str) and from_form and retry.lower() in ("true", "false", "1", "0"):
        retry = retry.lower() in ("true", "1")
    if retry is not None and not isinstance(retry, bool):
        raise ParameterError(f"retry_if_replica_dies must be true or false, got {retry!r}.")
    model = fields.pop("model", None)
    if model is not None and model != plan_name(plan):
        raise ParameterError(f"model {model!r} is not served here: this service runs the plan {plan_name(plan)!r} "
                             "only; leave model out or pass that name.")
    seconds = fields.pop("seconds", None)
    fixed = plan_seconds(plan)
    if seconds is not None and str(seconds) != fixed:
        l2 = plan.layer2_inference_config
        raise ParameterError(f"seconds {str(seconds)!r} is not what this plan makes: its videos are {fixed} s "
                             f"({l2.num_frames} frames at {l2.fps} fps, fixed when it was compiled); leave seconds "
                             f"out or pass {fixed!r}, or compile a recipe with another layer2.num_frames.")
    size = fields.pop("size", None)
    if size is not None:
        sizes = offered_sizes(plan)
        if str(size) not in sizes:
            raise ParameterError(f"size {str(size)!r} is not offered by this plan; its sizes are "
                                 f"{', '.join(sizes)} (width x height). Pick one of them, or add the resolution or "
                                 "aspect ratio to the recipe's layer3 choices and recompile.")
        resolution, ratio = sizes[str(size)]
        for name, value in (("resolution", resolution), ("aspect_ratio", ratio)):
            given = fields.get(name)
            if given is not None and given != value:
                raise ParameterError(f"size {size} means {name} {value!r}, but {name} {given!r} was given too; "
                                     "give one of them.")
            if name in specs:
                fields[name] = value
    if from_form:  # form fields arrive as text: an integer parameter is converted where it is one
        for name, spec in specs.items():
            value = fields.get(name)
            if spec.type == "integer" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
                fields[name] = int(value)
    check_prompts(plan, fields)  # telefuser-run's checks and messages
    values = {name: fields.get(name) for name in specs if name != "image"}
    if image is not None:
        if not takes_image(plan):
            raise image_not_taken(plan, f"<uploaded {IMAGE_FIELD}>", [IMAGE_FIELD])
        values["image"] = decode_image(image)
    elif takes_image(plan) and specs["image"].required:
        raise ParameterError(f"this image-to-video plan needs the video's first frame: upload it as the file field "
                             f"{IMAGE_FIELD!r} of a multipart/form-data request (a PNG, JPEG or WebP file).")
    params = resolve_parameters(plan, **values)
    return JobRequest(values=values, params=params, size=f"{params.width}x{params.height}", seconds=fixed,
                      prompt=params.prompt, retry=bool(retry))
