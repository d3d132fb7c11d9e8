"""compile: recipe -> Plan. A pure function of the recipe text, the weight headers and the target."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from telefuser.schema.canonical import plan_hash
from telefuser.schema.plan import PLAN_VERSION, Layer3Plan, Plan, RecipeInfo, UserParameter
from telefuser.schema.recipe import Recipe, Target
from telefuser.schema.enums import AspectRatio
from telefuser.schema.resolution import family_frame_size, frame_candidates

from .block_offload import check_offload_settings
from .dispatch import build_dispatch
from .executable import check_executable
from .memory import estimate_memory
from .memory_fit import refuse_over_capacity
from .mesh import build_mesh, check_parallel
from .models import check_compatible, plan_model
from .placement import resolve_placement
from .recipe_loader import LoadedRecipe, load_recipe
from .stages import build_stages
from .target import resolve_target

TELEFUSER_VERSION = "0.1.0"


def _layer3(recipe: Recipe) -> Layer3Plan:
    l3 = recipe.layer3
    negative_default = l3.negative_prompt.default or recipe.layer2.negative_prompt
    params = {
        "prompt": UserParameter(type="string", default=l3.prompt.default, required=l3.prompt.required,
                                description=l3.prompt.description or "What the video shows."),
        "negative_prompt": UserParameter(type="string", default=negative_default,
                                         description=l3.negative_prompt.description or "What to steer away from (CFG)."),
        "seed": UserParameter(type="integer", default=l3.seed.default, minimum=l3.seed.minimum, maximum=l3.seed.maximum,
                              description=l3.seed.description or "Noise seed: same seed, same plan, same machine, same video."),
        "resolution": UserParameter(type="choice", default=str(l3.resolution.default),
                                    choices=[str(c) for c in l3.resolution.choices],
                                    description=l3.resolution.description or "Frame size class."),
        "aspect_ratio": UserParameter(type="choice", default=str(l3.aspect_ratio.default),
                                      choices=[str(c) for c in l3.aspect_ratio.choices],
                                      description=l3.aspect_ratio.description or (
                                          "Width:height, or auto: the frame of the ratio closest to the image's."
                                          if AspectRatio.AUTO in l3.aspect_ratio.choices else "Width:height.")),
    }
    if l3.image is not None:
        params["image"] = UserParameter(type="path", required=l3.image.required, description=l3.image.description)
    # HunyuanVideo-1.5 records its published buckets (480p 16:9: 848x480), every other pipeline the table
    pipeline = recipe.layer1.pipeline
    fixed = [a for a in l3.aspect_ratio.choices if a != AspectRatio.AUTO]
    sizes = {str(r): {str(a): list(family_frame_size(pipeline, r, a)) for a in fixed} for r in l3.resolution.choices}
    # "auto": every frame the reference image may pick, so the runtime picks only among what the compiler allowed
    candidates = {str(r): [list(s) for s in frame_candidates(pipeline, r, AspectRatio.AUTO)]
                  for r in l3.resolution.choices} if AspectRatio.AUTO in l3.aspect_ratio.choices else {}
    return Layer3Plan(parameters=params, frame_sizes=sizes, image_frame_sizes=candidates)


def compile_loaded(loaded: LoadedRecipe, inspect_weights: bool = True, target: Target | None = None) -> Plan:
    recipe = loaded.recipe
    resolved = resolve_target(target or recipe.target)
    models = [plan_model(spec, recipe, loaded.path.parent, inspect_weights) for spec in recipe.layer1.models]
    if inspect_weights:
        check_compatible(models, recipe.layer1.pipeline)
    check_offload_settings(recipe, models)
    check_executable(recipe, models)
    check_parallel(recipe.layer2.parallel_config, models)
    dispatch = build_dispatch(models, recipe.layer2.models, resolved)
    stages = build_stages(recipe, models)
    memory = estimate_memory(recipe, models, resolved.memory_bytes, stages) if inspect_weights else None
    if memory is not None:
        refuse_over_capacity(memory, recipe, models, resolved)
    content: dict[str, Any] = {
        "format": "telefuser.plan",
        "version": PLAN_VERSION,
        "telefuser_version": TELEFUSER_VERSION,
        "recipe": RecipeInfo(name=recipe.name, description=recipe.description, path=str(loaded.path),
                             source_sha256=loaded.source_sha256).model_dump(mode="json"),
        "pipeline_type": recipe.layer1.pipeline,
        "device": resolved.device,
        "target": resolved.model_dump(mode="json"),
        "torch_dtype": recipe.layer1.torch_dtype,
        "layer1_model_definition": {"models": [m.model_dump(mode="json", by_alias=True) for m in models]},
        "layer2_inference_config": recipe.layer2.model_dump(mode="json", by_alias=True),
        "layer3_user_interface": _layer3(recipe).model_dump(mode="json"),
        "dispatch": [d.model_dump(mode="json") for d in dispatch],
        "mesh": build_mesh(recipe.layer2.parallel_config, resolved.num_devices).model_dump(mode="json"),
        "memory": memory.model_dump(mode="json") if memory else
        {"peak_bytes": 0, "capacity_bytes": resolved.memory_bytes, "breakdown": {}, "at": {"skipped": "--no-weights"}},
        "placement": [p.model_dump(mode="json") for p in resolve_placement(recipe, models, stages, memory,
                                                                           resolved.device)],
        "stages": [s.model_dump(mode="json") for s in stages],
    }
    # Hash exactly what the plan file will hold: pydantic's JSON dump of the validated plan.
    draft = Plan.model_validate({**content, "plan_hash": "", "timestamp": ""})
    raw = draft.model_dump(mode="json", by_alias=True)
    raw["plan_hash"] = plan_hash(raw)
    raw["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Plan.model_validate(raw)


def compile_recipe(recipe: str | Path | Recipe, overrides: Sequence[str] = (), inspect_weights: bool = True,
                   target: Target | None = None, base_dir: str | Path | None = None,
                   hash_weights: bool = False) -> Plan:
    """Recipe file, or Recipe built in Python, -> frozen Plan (raises TeleFuserError subclasses on bad input).

    A Recipe object's relative paths resolve against `base_dir` (default: the current directory); it compiles
    to the plan, hash included, of an equal recipe file `<base_dir>/<name>.toml` (see recipe_loader).
    `hash_weights` records every weight file's full SHA-256 (`telefuser-compile --hash-weights`)."""
    from telefuser.schema.fingerprint import recording_sha256

    loaded = load_recipe(recipe, overrides, base_dir=base_dir)
    with recording_sha256() if hash_weights else contextlib.nullcontext():
        return compile_loaded(loaded, inspect_weights=inspect_weights, target=target)
