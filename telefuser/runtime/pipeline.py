"""Wan text-to-video: the plan's stages, executed as recorded.

text encode (positive + negative prompt) -> seeded noise -> CFG denoising with
the plan's solver (one DiT, or Wan2.2's high-/low-noise pair switched at the
boundary) -> VAE decode -> uint8 frames.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from telefuser.errors import PlanError, TeleFuserError, WeightsError
from telefuser.schema.plan import Plan, Stage
from telefuser.schema.recipe import ModelRuntimeConfig

from .params import RunParameters, resolve_parameters
from .placement import Placement, peak_memory, reset_peak_memory
from .video import Timings, Video


class OutOfMemory(TeleFuserError):
    """The device ran out of memory while executing a plan."""


@dataclass
class _RunState:
    params: RunParameters
    timings: Timings
    progress: bool
    context: Optional[torch.Tensor] = None
    context_null: Optional[torch.Tensor] = None
    latents: Optional[torch.Tensor] = None
    frames: Optional[np.ndarray] = None
    writer: dict = field(default_factory=dict)


def unsupported_features(plan: Plan) -> list[str]:
    """Plan settings this runtime cannot honour yet (refused rather than silently ignored)."""
    l2 = plan.layer2_inference_config
    found = [name for name in ("enable_clip_stage", "enable_vfi", "enable_sr") if getattr(l2, name)]
    if l2.lq_noise_strength:
        found.append("lq_noise_strength")
    for name, cfg in l2.models.items():
        if cfg.offload_config.offload_type not in ("NO_CPU_OFFLOAD", "MODEL_CPU_OFFLOAD"):
            found.append(f"models.{name}.offload_config.offload_type = {cfg.offload_config.offload_type}")
        if cfg.attention_config.sparse_config is not None:
            found.append(f"models.{name}.attention_config.sparse_config")
        if cfg.feature_cache_config.method != "none":
            found.append(f"models.{name}.feature_cache_config.method = {cfg.feature_cache_config.method}")
    if plan.pipeline_type != "wan_t2v":
        found.append(f"pipeline {plan.pipeline_type}")
    return found


class Pipeline:
    """A loaded plan: call `run` once per video. Build it with `telefuser.load_plan`."""

    def __init__(self, plan: Plan, plan_path: str | Path = "<memory>") -> None:
        from .loading import build_model
        from .plan_io import check_fingerprints, check_target

        self.plan = plan
        self.plan_path = str(plan_path)
        check_target(plan)
        missing = unsupported_features(plan)
        if missing:
            raise PlanError(
                f"the plan uses {', '.join(missing)}, which this runtime does not execute yet; "
                "remove these settings from the recipe and recompile."
            )
        check_fingerprints(plan)
        self.device = torch.device(plan.device)
        start = time.perf_counter()
        self.placements: dict[str, Placement] = {}  # by model name
        self.tokenizers: dict[str, object] = {}
        for planned in plan.layer1_model_definition.models:
            if planned.role == "tokenizer":
                self.tokenizers[planned.name] = _load_tokenizer(planned, plan.layer2_inference_config.text_len)
                continue
            runtime = plan.layer2_inference_config.models.get(planned.name, ModelRuntimeConfig())
            offload = runtime.offload_config.offload_type == "MODEL_CPU_OFFLOAD"
            with _oom_guard(f"loading model {planned.name!r}"):
                module = build_model(planned, runtime, torch.device("cpu") if offload else self.device,
                                     base_dir=Path(plan.recipe.path).parent)
            self.placements[planned.name] = Placement(module, self.device, offload)
        self.load_seconds = time.perf_counter() - start

    def _dispatch(self, name: str):
        from telefuser.ops.dispatch import use_dispatch

        return use_dispatch(self.plan.dispatch_table(name))

    @property
    def _stage_runners(self) -> dict[str, Callable[[_RunState, Stage], None]]:
        return {
            "load": lambda state, stage: None,  # done once, by the constructor
            "text_encode": self._encode,
            "noise": self._noise,
            "denoise": self._denoise,
            "vae_decode": self._decode,
            "write_video": self._writer_settings,
        }

    # ------------------------------------------------------------------ run

    def run(
        self,
        prompt: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        seed: Optional[int] = None,
        resolution: Optional[str] = None,
        aspect_ratio: Optional[str] = None,
        progress: bool = True,
    ) -> Video:
        """Generate one video; parameters left as None take the plan's defaults."""
        params = resolve_parameters(
            self.plan, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
            resolution=resolution, aspect_ratio=aspect_ratio,
        )
        state = _RunState(params=params, timings=Timings(load=self.load_seconds), progress=progress)
        reset_peak_memory(self.device)
        runners = self._stage_runners
        for stage in self.plan.stages:
            runner = runners.get(stage.kind)
            if runner is None:
                raise PlanError(
                    f"the plan's stage {stage.name!r} has kind {stage.kind!r}, which this runtime does not "
                    f"execute (it runs {', '.join(runners)}); recompile the recipe with this TeleFuser version."
                )
            with _oom_guard(f"stage {stage.name!r}"), torch.inference_mode():
                runner(state, stage)
        if state.frames is None or "fps" not in state.writer:
            raise PlanError("the plan has no vae_decode or write_video stage, so it makes no video; recompile it.")
        state.timings.peak_memory_bytes, state.timings.peak_memory_kind = peak_memory(self.device)
        return Video(frames=state.frames, timings=state.timings, **state.writer)

    # ------------------------------------------------------------------ stages

    def _encode(self, state: _RunState, stage: Stage) -> None:
        from .text import encode_prompts

        start = time.perf_counter()
        tokenizer_name, encoder_name = stage.models
        prompts = [state.params.prompt]
        if stage.params["negative"]:
            prompts.append(state.params.negative_prompt)
        with self.placements[encoder_name].active() as encoder, self._dispatch(encoder_name):
            context = encode_prompts(encoder, self.tokenizers[tokenizer_name], prompts, self.device)
        state.context = context[:1]
        state.context_null = context[1:] if len(prompts) > 1 else None
        self._sync()
        state.timings.encode = time.perf_counter() - start

    def _noise(self, state: _RunState, stage: Stage) -> None:
        p = stage.params
        if p["generator"] != "cpu":
            raise PlanError(f"the plan asks for a {p['generator']!r} noise generator; this runtime draws on the CPU.")
        space, time_ratio = p["spatial_ratio"], p["temporal_ratio"]
        if p["num_frames"] % time_ratio != 1 % time_ratio or state.params.height % space or state.params.width % space:
            raise PlanError(
                f"{p['num_frames']} frames of {state.params.width}x{state.params.height} do not fit the VAE's "
                f"{time_ratio}x{space}x{space} compression; pick another resolution and recompile."
            )
        shape = (1, p["latent_channels"], (p["num_frames"] - 1) // time_ratio + 1,
                 state.params.height // space, state.params.width // space)
        # Drawn on the CPU, then moved: the same seed gives the same noise on any device.
        generator = torch.Generator("cpu").manual_seed(state.params.seed)
        state.latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def _phases(self, stage: Stage) -> list[tuple[str, float, float]]:
        """(model, cfg scale, lowest timestep it serves): one DiT, or Wan2.2's pair split at the boundary."""
        p = stage.params
        if "phases" not in p:
            return [(stage.models[0], p["cfg_scale"], float("-inf"))]
        high, low = p["phases"]
        return [(high["model"], high["cfg_scale"], p["boundary_timestep"]), (low["model"], low["cfg_scale"], float("-inf"))]

    def _denoise(self, state: _RunState, stage: Stage) -> None:
        from tqdm.auto import tqdm

        from .solvers import make_solver

        p = stage.params
        solver = make_solver(p["solver"], p["num_inference_steps"], p["sigma_shift"], p["num_train_timesteps"])
        timesteps = list(solver.timesteps)
        latents = state.latents
        context_null = state.context_null if p["cfg"] else None
        bar = tqdm(total=len(timesteps), desc="denoising", unit="step", disable=not state.progress)
        index = 0
        for name, scale, lowest_t in self._phases(stage):
            span = []
            while index < len(timesteps) and float(timesteps[index]) >= lowest_t:
                span.append(timesteps[index])
                index += 1
            if not span:
                continue
            with self.placements[name].active() as dit, self._dispatch(name):
                dtype = next(dit.parameters()).dtype
                for t in span:
                    start = time.perf_counter()
                    velocity = _guided(dit, latents.to(dtype), t.reshape(1).to(self.device),
                                       state.context.to(dtype), context_null, scale)
                    latents = solver.step(velocity, t, latents)
                    self._sync()
                    state.timings.steps.append(time.perf_counter() - start)
                    bar.update(1)
        bar.close()
        state.latents = latents

    def _decode(self, state: _RunState, stage: Stage) -> None:
        start = time.perf_counter()
        (name,) = stage.models
        with self.placements[name].active() as vae, self._dispatch(name):
            dtype = next(vae.parameters()).dtype
            kwargs = {"tiled": True, "tile_size": tuple(stage.params["tile_size"])} if stage.params["tiled"] else {}
            video = vae.decode(state.latents.to(dtype), **kwargs)
        # [-1, 1] -> uint8, [B, 3, F, H, W] -> [F, H, W, 3]
        pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        state.frames = pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy()
        self._sync()
        state.timings.decode = time.perf_counter() - start

    def _writer_settings(self, state: _RunState, stage: Stage) -> None:
        p = stage.params
        if (p["container"], p["codec"], p["pixel_format"]) != ("mp4", "libx264", "yuv420p"):
            raise PlanError(f"this runtime writes mp4/libx264/yuv420p, not {p['container']}/{p['codec']}/"
                            f"{p['pixel_format']}; recompile the recipe with this TeleFuser version.")
        state.writer["fps"] = p["fps"]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _guided(dit: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
            context_null: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), in float32."""
    cond = dit(x, t, context).float()
    if context_null is None or scale == 1.0:
        return cond  # scale 1 gives exactly the conditional prediction
    uncond = dit(x, t, context_null.to(context.dtype)).float()
    return uncond + scale * (cond - uncond)


def _load_tokenizer(planned, text_len: int):
    from telefuser.models.t5.tokenizer import UMT5Tokenizer

    path = planned.files[0].path if planned.files else planned.path
    try:
        return UMT5Tokenizer(path, text_len=text_len)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot load tokenizer {planned.name!r} from {path!r}: {exc}") from exc


@contextlib.contextmanager
def _oom_guard(what: str):
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError naming the failed allocation.
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        raise OutOfMemory(
            f"out of memory during {what}: {str(exc).splitlines()[0]}; lower the resolution or frame count, "
            "or enable offload (layer2.models.<name>.offload_config.offload_type = \"MODEL_CPU_OFFLOAD\") and recompile."
        ) from exc
