"""TeleFuser: video diffusion where configuration is a compiler (recipe -> plan -> video).

`import telefuser` stays light: torch and the models load on the first `load_plan`.

    import telefuser
    video = telefuser.load_plan("plan.json").run(prompt="a cat surfing", seed=7)
    video.save("cat.mp4")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from telefuser.runtime.pipeline import Pipeline
    from telefuser.runtime.video import Video

__all__ = ["load_plan", "Pipeline", "Video"]


def load_plan(path: str) -> "Pipeline":
    """Read a compiled plan, check it (hash, weight fingerprints, this machine) and load its models."""
    from telefuser.runtime.api import load_plan as _load

    return _load(path)


def __getattr__(name: str):
    # Pipeline and Video are importable from the top level without importing torch up front.
    if name == "Pipeline":
        from telefuser.runtime.pipeline import Pipeline

        return Pipeline
    if name == "Video":
        from telefuser.runtime.video import Video

        return Video
    raise AttributeError(f"module 'telefuser' has no attribute {name!r}")
