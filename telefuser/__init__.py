"""TeleFuser: video diffusion where configuration is a compiler (recipe -> plan -> video).

`import telefuser` stays light: torch and the models load on the first `load_plan`.

    import telefuser
    video = telefuser.load_plan("plan.json").run(prompt="a cat surfing", seed=7)
    video.save("cat.mp4")

    plan = telefuser.compile("recipes/tiny.toml")   # or a Recipe built with telefuser.core.config
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from telefuser.runtime.pipeline import Pipeline
    from telefuser.runtime.io.video import Video
    from telefuser.schema.plan import Plan
    from telefuser.schema.recipe import Recipe, Target

__all__ = ["compile", "load_plan", "Pipeline", "Video"]


def compile(recipe: "str | Path | Recipe", *, base_dir: "str | Path | None" = None, overrides: "Sequence[str]" = (),
            inspect_weights: bool = True, target: "Target | None" = None,
            hash_weights: bool = False) -> "Plan":  # noqa: A001 (the API's name)
    """Compile a recipe (a .toml path, or a Recipe built in Python) into its frozen Plan; no GPU, no weights loaded.

    A Recipe object's relative weight paths resolve against `base_dir` (default: the current directory), and it
    compiles to the same plan, plan_hash included, as an equal recipe file saved as `<base_dir>/<name>.toml`.
    The plan file `telefuser-compile` writes is `telefuser.schema.canonical.pretty_json(plan.model_dump(mode="json",
    by_alias=True))`, written with `telefuser.atomic.atomic_output`. `hash_weights` records each weight file's
    full SHA-256, which `load_plan` then verifies.
    """
    from telefuser.compiler.build import compile_recipe

    return compile_recipe(recipe, overrides, inspect_weights=inspect_weights, target=target, base_dir=base_dir,
                          hash_weights=hash_weights)


def load_plan(path: str, verify_weights: "bool | None" = None) -> "Pipeline":
    """Read a compiled plan, check it (hash, weight fingerprints, this machine) and load its models;
    `verify_weights` (default: when the plan records SHA-256s) also re-hashes every weight file."""
    from telefuser.runtime.api import load_plan as _load

    return _load(path, verify_weights)


def __getattr__(name: str):
    # Pipeline and Video are importable from the top level without importing torch up front.
    if name == "Pipeline":
        from telefuser.runtime.pipeline import Pipeline

        return Pipeline
    if name == "Video":
        from telefuser.runtime.io.video import Video

        return Video
    raise AttributeError(f"module 'telefuser' has no attribute {name!r}")
