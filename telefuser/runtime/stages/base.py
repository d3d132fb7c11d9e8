"""What every stage gets: the loaded pipeline's resources (StageContext) and one run's state (RunState)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Protocol

import numpy as np
import torch

from telefuser.distributed.rank import RankContext
from telefuser.errors import PlanError
from telefuser.schema.plan import Plan, Stage
from telefuser.schema.resolution import frame_key

from telefuser.runtime.io.params import RunParameters
from telefuser.runtime.memory.placement import Placement
from telefuser.runtime.io.video import Timings


class StageContext(Protocol):
    """The loaded pipeline as its stages see it."""

    plan: Plan
    device: torch.device
    rank: RankContext
    placements: dict[str, Placement]
    tokenizers: dict[str, object]

    def dispatch(self, model: str) -> ContextManager[None]: ...

    def sync(self) -> None: ...


@dataclass
class RunState:
    params: RunParameters
    timings: Timings
    progress: bool
    context: Optional[torch.Tensor] = None
    context_null: Optional[torch.Tensor] = None
    latents: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None  # the seeded noise generator (a re-noising solver draws on from it)
    image: Optional[torch.Tensor] = None  # image-to-video: the first frame [1, 3, H, W] in [-1, 1] (replica lead)
    clip_fea: Optional[torch.Tensor] = None  # CLIP tokens of the image [1, tokens, dim]
    y: Optional[torch.Tensor] = None  # the DiT's conditioning channels: first-frame mask + VAE latents
    image_latent: Optional[torch.Tensor] = None  # TI2V: the image's VAE latent [1, z, 1, h, w], the first latent frame
    frames: Optional[np.ndarray] = None
    device_frames: Optional[torch.Tensor] = None  # the decode's uint8 [F, H, W, 3] left on the device for the vfi stage
    # a model family's own inputs between its stages (HunyuanVideo-1.5: "text" per CFG branch, "vision_states")
    family: dict = field(default_factory=dict)
    writer: dict = field(default_factory=dict)
    on_step: Optional[Callable[[int, int], None]] = None  # (steps done, total) after each denoising step; may raise


StageRunner = Callable[[StageContext, RunState, Stage], None]
STAGES: dict[str, StageRunner] = {"load": lambda ctx, state, stage: None}  # load: done once, by the constructor


def register(kind: str) -> Callable[[StageRunner], StageRunner]:
    def add(runner: StageRunner) -> StageRunner:
        STAGES[kind] = runner
        return runner
    return add


@contextlib.contextmanager
def timed(timings: Timings, name: str, ctx: StageContext):
    """Adds the wall time of the block (device work included) to `timings.<name>`."""
    import time

    start = time.perf_counter()
    yield
    ctx.sync()
    setattr(timings, name, getattr(timings, name) + time.perf_counter() - start)


def sr_frame(stage: Stage, state: RunState) -> tuple[int, int]:
    """(width, height) of the SR frame the plan recorded for this run's base frame (HunyuanVideo-1.5's SR stages:
    `frame_sizes`, base frame "WxH" -> the SR frame; the compiler recorded one per base frame a run may generate,
    the fixed ratios' and "auto"'s candidates)."""
    key = frame_key(state.params.width, state.params.height)
    size = stage.params.get("frame_sizes", {}).get(key)
    if size is None:
        raise PlanError(f"the plan's stage {stage.name!r} records no SR frame for this run's base frame {key} "
                        f"(resolution {state.params.resolution}, aspect ratio {state.params.aspect_ratio}); recompile "
                        "the recipe with this version.")
    return int(size[0]), int(size[1])
