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
from telefuser.schema.plan import Plan
from telefuser.schema.recipe import ModelRuntimeConfig

from .params import RunParameters, resolve_parameters
from .placement import Placement, peak_memory, reset_peak_memory
from .video import Timings, Video

DIT_ROLES = ("dit", "dit_high_noise", "dit_low_noise")


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
    extra: dict = field(default_factory=dict)


def unsupported_features(plan: Plan) -> list[str]:
    """Plan settings this runtime cannot honour yet (refused rather than silently ignored)."""
    l2 = plan.layer2_inference_config
    found = [name for name in ("enable_clip_stage", "enable_vfi", "enable_sr") if getattr(l2, name)]
    if l2.lq_noise_strength:
        found.append("lq_noise_strength")
    for name, cfg in l2.models.items():
        if cfg.offload.mode not in ("NO_CPU_OFFLOAD", "MODEL_CPU_OFFLOAD"):
            found.append(f"models.{name}.offload.mode = {cfg.offload.mode}")
        if cfg.attention.sparse is not None:
            found.append(f"models.{name}.attention.sparse")
        if cfg.feature_cache.method != "none":
            found.append(f"models.{name}.feature_cache.method = {cfg.feature_cache.method}")
    if plan.pipeline_type != "wan_t2v":
        found.append(f"pipeline {plan.pipeline_type}")
    return found


class Pipeline:
    """A loaded plan: call `run` once per video. Build it with `telefuser.load_plan`."""

    def __init__(self, plan: Plan, plan_path: str | Path = "<memory>") -> None:
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
        self.placements: dict[str, Placement] = {}
        self.tokenizer = None
        for planned in plan.layer1_model_definition.models:
            if planned.role == "tokenizer":
                self.tokenizer = _load_tokenizer(planned, plan.layer2_inference_config.text_len)
                continue
            runtime = plan.layer2_inference_config.models.get(planned.name, ModelRuntimeConfig())
            offload = runtime.offload.mode == "MODEL_CPU_OFFLOAD"
            resident = torch.device("cpu") if offload else self.device
            from .loading import build_model

            with _oom_guard(f"loading model {planned.name!r}"):
                module = build_model(planned, runtime, resident)
            self.placements[planned.role] = Placement(module, self.device, offload)
        self.load_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ helpers

    def _name(self, role: str) -> str:
        return self.plan.model(role).name

    def _dispatch(self, role: str):
        from telefuser.ops.dispatch import use_dispatch

        return use_dispatch(self.plan.dispatch_table(self._name(role)))

    @property
    def _stage_runners(self) -> dict[str, Callable[[_RunState, dict], None]]:
        return {"text_encode": self._encode, "denoise": self._denoise, "vae_decode": self._decode}

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
                    f"the plan's stage {stage.name!r} has kind {stage.kind!r}, which this runtime does not know "
                    f"(it runs {', '.join(runners)}); recompile the recipe with this TeleFuser version."
                )
            with _oom_guard(f"stage {stage.name!r}"), torch.inference_mode():
                runner(state, stage.params)
        if state.frames is None:
            raise PlanError("the plan has no decode stage, so it produces no frames; recompile the recipe.")
        state.timings.peak_memory_bytes, state.timings.peak_memory_kind = peak_memory(self.device)
        return Video(frames=state.frames, fps=self.plan.layer2_inference_config.fps, timings=state.timings)

    # ------------------------------------------------------------------ stages

    def _encode(self, state: _RunState, params: dict) -> None:
        from .text import encode_prompts

        start = time.perf_counter()
        prompts = [state.params.prompt]
        if self._uses_cfg():
            prompts.append(state.params.negative_prompt)
        with self.placements["text_encoder"].active() as encoder, self._dispatch("text_encoder"):
            context = encode_prompts(encoder, self.tokenizer, prompts, self.device)
        state.context = context[:1]
        state.context_null = context[1:] if len(prompts) > 1 else None
        self._sync()
        state.timings.encode = time.perf_counter() - start

    def _uses_cfg(self) -> bool:
        l2 = self.plan.layer2_inference_config
        scales = [l2.cfg_scale] if "dit" in self.placements else [
            l2.cfg_scale if s is None else s for s in (l2.cfg_scale_high, l2.cfg_scale_low)
        ]
        # A scale of 1 makes the guided prediction equal the conditional one: no negative branch needed.
        return any(s != 1.0 for s in scales)

    def _latent_shape(self, p: RunParameters) -> tuple[int, ...]:
        vae = self.plan.model("vae").arch
        spatial = 2 ** (len(vae["dim_mult"]) - 1)
        temporal = 2 ** sum(bool(t) for t in vae["temporal_downsample"])
        frames = self.plan.layer2_inference_config.num_frames
        dit = self.plan.model("dit" if "dit" in self.placements else "dit_high_noise").arch
        patch = dit["patch_size"]
        lat = ((frames - 1) // temporal + 1, p.height // spatial, p.width // spatial)
        if any(n % k for n, k in zip(lat, patch)):
            raise PlanError(
                f"{p.width}x{p.height} with {frames} frames gives latents {lat}, not divisible by the DiT's patch "
                f"{tuple(patch)}; use another resolution or frame count and recompile."
            )
        return (1, vae["z_dim"], *lat)

    def _experts(self) -> list[tuple[str, float, float]]:
        """(role, cfg scale, lowest timestep it serves): one DiT, or Wan2.2's pair split at the boundary."""
        l2 = self.plan.layer2_inference_config
        if "dit" in self.placements:
            return [("dit", l2.cfg_scale, float("-inf"))]
        boundary_t = l2.boundary * 1000  # boundary is a fraction of num_train_timesteps (1000 for Wan)
        high = l2.cfg_scale if l2.cfg_scale_high is None else l2.cfg_scale_high
        low = l2.cfg_scale if l2.cfg_scale_low is None else l2.cfg_scale_low
        return [("dit_high_noise", high, boundary_t), ("dit_low_noise", low, float("-inf"))]

    def _denoise(self, state: _RunState, params: dict) -> None:
        from tqdm.auto import tqdm

        from .solvers import make_solver

        l2 = self.plan.layer2_inference_config
        shape = self._latent_shape(state.params)
        # Noise is drawn on the CPU so that a seed gives the same video on any device type.
        generator = torch.Generator("cpu").manual_seed(state.params.seed)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        solver = make_solver(l2.sample_solver, l2.num_inference_steps, l2.sigma_shift)
        timesteps = list(solver.timesteps)
        bar = tqdm(total=len(timesteps), desc="denoising", unit="step", disable=not state.progress)
        index = 0
        for role, scale, lowest_t in self._experts():
            span = []
            while index < len(timesteps) and float(timesteps[index]) >= lowest_t:
                span.append(timesteps[index])
                index += 1
            if not span:
                continue
            with self.placements[role].active() as dit, self._dispatch(role):
                for t in span:
                    start = time.perf_counter()
                    velocity = self._guided(dit, latents, t, state, scale)
                    latents = solver.step(velocity, t, latents)
                    self._sync()
                    state.timings.steps.append(time.perf_counter() - start)
                    bar.update(1)
        bar.close()
        state.latents = latents

    def _guided(self, dit: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, state: _RunState,
                scale: float) -> torch.Tensor:
        dtype = next(dit.parameters()).dtype
        x = latents.to(dtype)
        timestep = t.reshape(1).to(self.device)
        cond = dit(x, timestep, state.context.to(dtype)).float()
        if state.context_null is None or scale == 1.0:
            return cond
        uncond = dit(x, timestep, state.context_null.to(dtype)).float()
        return uncond + scale * (cond - uncond)

    def _decode(self, state: _RunState, params: dict) -> None:
        start = time.perf_counter()
        l2 = self.plan.layer2_inference_config
        with self.placements["vae"].active() as vae, self._dispatch("vae"):
            dtype = next(vae.parameters()).dtype
            kwargs = {"tiled": True, "tile_size": tuple(l2.tile_size)} if l2.tiled else {}
            video = vae.decode(state.latents.to(dtype), **kwargs)
        # [-1, 1] -> uint8, [B, 3, F, H, W] -> [F, H, W, 3]
        pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        state.frames = pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy()
        state.timings.decode = time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(
            f"out of memory during {what}: {str(exc).splitlines()[0]}; lower the resolution or frame count, "
            "or enable offload (layer2.models.<name>.offload.mode = \"MODEL_CPU_OFFLOAD\") and recompile."
        ) from exc
