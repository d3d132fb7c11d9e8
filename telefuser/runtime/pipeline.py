"""Wan text- and image-to-video: the plan's stages, executed as recorded, on one rank or on the plan's mesh.

Each stage kind is a module of `telefuser.runtime.stages`; this module loads the models (each rank
only those it uses), applies the plan's parallelism and runs the stages in order.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from telefuser.errors import PlanError, TeleFuserError, WeightsError
from telefuser.schema.plan import Plan
from telefuser.schema.recipe import ModelRuntimeConfig

from .params import RunParameters, resolve_parameters
from .offload import PrefetchSchedule
from .placement import Placement, peak_memory, reset_peak_memory
from .video import Timings, Video


class OutOfMemory(TeleFuserError):
    """The device ran out of memory while executing a plan."""


# Roles whose models only each dp replica's lead uses: it encodes the text (broadcast to the others)
# and decodes; unless the plan shares them (FSDP: every rank runs the sharded text encoder; VAE parallel).
WRITER_ROLES = ("tokenizer", "text_encoder", "image_encoder", "vae")
BLOCK_MODES = ("SEQUENTIAL_CPU_OFFLOAD", "ASYNC_CPU_OFFLOAD")
# Models whose weights enable_fsdp shards over all ranks.
FSDP_ROLES = ("dit", "dit_high_noise", "dit_low_noise", "text_encoder")


def _shared(role: str, plan: Plan) -> bool:
    """Whether every rank, not only the replica's lead, runs the model of this role."""
    l2 = plan.layer2_inference_config
    if role == "vae":
        return l2.enable_vae_parallel
    return l2.parallel_config.enable_fsdp and role in ("tokenizer", "text_encoder")


def _parallelize(module: torch.nn.Module, role: str, mesh, sharded: bool) -> None:
    """The plan's parallelism on one loaded model: tp, then the sequence hooks (which see the local heads),
    then FSDP over all ranks."""
    if role.startswith("dit"):
        from telefuser.distributed.parallelize_wan import parallelize_wan_dit
        from telefuser.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(module, mesh)
        parallelize_wan_dit(module, mesh)
    if sharded:
        from telefuser.distributed.fsdp import apply_fsdp

        apply_fsdp(module, mesh)


def unsupported_features(plan: Plan) -> list[str]:
    """Plan settings this runtime cannot honour yet (refused rather than silently ignored)."""
    l2 = plan.layer2_inference_config
    found = [name for name in ("enable_vfi", "enable_sr") if getattr(l2, name)]
    if l2.lq_noise_strength:
        found.append("lq_noise_strength")
    parallel = l2.parallel_config
    if parallel.pp_degree > 1:
        found.append(f"parallel_config.pp_degree = {parallel.pp_degree}")
    if parallel.tp_degree > 1:  # DTensor weights stay on their device and replace plain nn.Linear layers
        for model in plan.layer1_model_definition.models:
            cfg = l2.models.get(model.name, ModelRuntimeConfig())
            if model.role.startswith("dit") and cfg.offload_config.offload_type != "NO_CPU_OFFLOAD":
                found.append(f"tp_degree > 1 with models.{model.name}.offload_config")
            if model.role.startswith("dit") and cfg.quant_config.quant_type != "none":
                found.append(f"tp_degree > 1 with models.{model.name}.quant_config")
            if model.role.startswith("dit") and cfg.compile_config.enabled:
                found.append(f"tp_degree > 1 with models.{model.name}.compile_config")
    if parallel.enable_fsdp:  # every rank runs every sharded forward in step: no uneven dp batches, no movers
        if parallel.dp_degree > 1:
            found.append("enable_fsdp with dp_degree > 1")
        if parallel.tp_degree > 1:
            found.append("enable_fsdp with tp_degree > 1")
        found += [f"enable_fsdp with models.{name}.offload_config" for name, cfg in l2.models.items()
                  if cfg.offload_config.offload_type != "NO_CPU_OFFLOAD"]
    for name, cfg in l2.models.items():
        if cfg.offload_config.offload_type in BLOCK_MODES and plan.memory.block_plan(name) is None:
            found.append(f"models.{name}.offload_config.offload_type = {cfg.offload_config.offload_type} without "
                         "its streaming in plan.memory.block_offload (compiled with --no-weights?)")
        if cfg.attention_config.sparse_config is not None:
            found.append(f"models.{name}.attention_config.sparse_config")
        if cfg.feature_cache_config.method != "none":
            found.append(f"models.{name}.feature_cache_config.method = {cfg.feature_cache_config.method}")
    if plan.pipeline_type not in ("wan_t2v", "wan_i2v", "wan_ti2v"):
        found.append(f"pipeline {plan.pipeline_type}")
    return found


class Pipeline:
    """A loaded plan: call `run` once per video. Build it with `telefuser.load_plan`.

    On a plan of several ranks every rank builds its Pipeline (under `telefuser-run`, which starts the
    ranks, or torchrun); `run` returns the video on rank 0 and None elsewhere.
    """

    def __init__(self, plan: Plan, plan_path: str | Path = "<memory>") -> None:
        from telefuser.distributed import rank as ranks

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
        start = time.perf_counter()
        self.rank = ranks.join(plan)  # refuses a launch that does not fit the plan before anything loads
        self.device = self.rank.device
        self.placements: dict[str, Placement] = {}  # by model name
        self.prefetch = PrefetchSchedule(plan.memory.prefetch, self.placements, self.device)  # the plan's decisions
        self.tokenizers: dict[str, object] = {}
        l2 = plan.layer2_inference_config
        load_stage = next((s.name for s in plan.stages if s.kind == "load"), None)
        at_load = {d.model for d in plan.memory.prefetch  # read straight to the device for the first video
                   if d.prefetch and d.during_model is None and d.during_stage == load_stage}
        for planned in plan.layer1_model_definition.models:
            if planned.role in WRITER_ROLES and not self.rank.is_writer and not _shared(planned.role, plan):
                continue
            if planned.role == "tokenizer":
                self.tokenizers[planned.name] = _load_tokenizer(planned, l2.text_len)
                continue
            runtime = l2.models.get(planned.name, ModelRuntimeConfig())
            offload = runtime.offload_config.offload_type == "MODEL_CPU_OFFLOAD"
            blocks = plan.memory.block_plan(planned.name) if runtime.offload_config.offload_type in BLOCK_MODES else None
            sharded = l2.parallel_config.enable_fsdp and planned.role in FSDP_ROLES and self.rank.mesh is not None
            first_on_device = offload and planned.name in at_load
            device = torch.device("cpu") if runtime.run_on_cpu else self.device  # run_on_cpu: encoders only
            with _oom_guard(f"loading model {planned.name!r}"):
                # FSDP takes the model from the CPU and moves each rank's share of every block to the device;
                # block offload packs the streamed blocks from host memory and moves the rest.
                on_cpu = (offload and not first_on_device) or sharded or blocks is not None
                module = build_model(planned, runtime, torch.device("cpu") if on_cpu else device,
                                     base_dir=Path(plan.recipe.path).parent)
                if self.rank.mesh is not None:
                    _parallelize(module, planned.role, self.rank.mesh, sharded)
                self.placements[planned.name] = Placement(
                    module, device, offload, name=planned.name, pin=runtime.offload_config.pin_cpu_memory,
                    schedule=self.prefetch, loaded_on_device=first_on_device, blocks=blocks)
        self._warm_up(plan)
        self.load_seconds = time.perf_counter() - start

    def _warm_up(self, plan: Plan) -> None:
        """Run, on an empty prompt, a text encoder the plan reads to the device at load (its decision's reason says
        so), so that the first video's stage pays no first-call setup (Triton compilation, library handles)."""
        from .text import encode_prompts

        stages = {s.name: s for s in plan.stages}
        load = next((s.name for s in plan.stages if s.kind == "load"), None)
        for d in plan.memory.prefetch:
            stage = stages.get(d.stage)
            at_load = d.prefetch and d.during_model is None and d.during_stage == load
            if not at_load or stage is None or stage.kind != "text_encode" or d.model not in self.placements:
                continue
            # the module is still on the tensors it was loaded with; not through active(), which would count this
            # as the use they were loaded for
            with torch.inference_mode(), self.dispatch(d.model):
                encode_prompts(self.placements[d.model].module, self.tokenizers[stage.models[0]], [""], self.device)
        self.sync()

    def dump_config(self, path: str | Path | None = None) -> dict:
        """The plan this pipeline runs, as a dict (`layer1_model_definition`, `layer2_inference_config`, ...);
        with `path`, also written there atomically as the plan file telefuser-compile writes, which loads and
        runs identically (same plan_hash)."""
        from telefuser.atomic import atomic_output
        from telefuser.schema.canonical import pretty_json

        config = self.plan.model_dump(mode="json", by_alias=True)
        if path is not None:
            with atomic_output(Path(path)) as tmp:
                tmp.write_text(pretty_json(config), encoding="utf-8")
        return config

    def dispatch(self, model: str):
        from telefuser.ops.dispatch import use_dispatch

        return use_dispatch(self.plan.dispatch_table(model))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Leave the process group (several ranks); the models are freed with the Pipeline."""
        self.rank.close()

    def run(
        self,
        prompt: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        seed: Optional[int] = None,
        resolution: Optional[str] = None,
        aspect_ratio: Optional[str] = None,
        progress: bool = True,
        image=None,
        on_step=None,
    ) -> Optional[Video]:
        """Generate one video; parameters left as None take the plan's defaults. None on ranks other than 0
        (under dp, replica 0 makes it and the other replicas wait). `image` (image-to-video plans): the first
        frame, as a file path, a PIL image or a numpy array [H, W, 3] uint8 RGB. `on_step(done, total)` is called
        after each denoising step; an exception it raises aborts the run there."""
        params = resolve_parameters(
            self.plan, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
            resolution=resolution, aspect_ratio=aspect_ratio, image=image,
        )
        if self.rank.dp_index != 0:
            return None
        video = self._generate(params, progress, on_step)
        return video if self.rank.rank == 0 else None

    def run_many(
        self,
        prompts: Sequence[str],
        negative_prompt: Optional[str] = None,
        seed: Optional[int] = None,
        resolution: Optional[str] = None,
        aspect_ratio: Optional[str] = None,
        progress: bool = True,
        image=None,
    ) -> Iterator[tuple[int, Video]]:
        """A video per prompt, each with the same seed and settings (prompt i's video is the one `run` makes
        for it). Prompt i goes to dp replica i % dp_degree; each replica's lead yields (i, video) as it is done."""
        batch = []
        for p in prompts:
            batch.append(resolve_parameters(self.plan, prompt=p, negative_prompt=negative_prompt, seed=seed,
                                            resolution=resolution, aspect_ratio=aspect_ratio, image=image))
            image = batch[-1].image or image  # a file is read and checked once, then shared by every prompt
        for index in range(self.rank.dp_index, len(batch), self.rank.degree("dp")):
            video = self._generate(batch[index], progress)
            if video is not None:
                yield index, video

    def _generate(self, params: RunParameters, progress: bool, on_step=None) -> Optional[Video]:
        """One video from resolved parameters, on every rank of this dp replica; the Video on its lead."""
        from .stages import STAGES, RunState

        state = RunState(params=params, timings=Timings(load=self.load_seconds), progress=progress, on_step=on_step)
        reset_peak_memory(self.device)
        for stage in self.plan.stages:
            runner = STAGES.get(stage.kind)
            if runner is None:
                raise PlanError(
                    f"the plan's stage {stage.name!r} has kind {stage.kind!r}, which this runtime does not "
                    f"execute (it runs {', '.join(STAGES)}); recompile the recipe with this TeleFuser version."
                )
            with _oom_guard(f"stage {stage.name!r}"), torch.inference_mode():
                self.prefetch.enter_stage(stage.name)
                runner(self, state, stage)
        if not self.rank.is_writer:
            return None
        if state.frames is None or "fps" not in state.writer:
            raise PlanError("the plan has no vae_decode or write_video stage, so it makes no video; recompile it.")
        state.timings.peak_memory_bytes, state.timings.peak_memory_kind = peak_memory(self.device)
        return Video(frames=state.frames, timings=state.timings, **state.writer)


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
            "or enable offload (layer2.models.<name>.offload_config.offload_type = \"MODEL_CPU_OFFLOAD\", for a DiT "
            "\"ASYNC_CPU_OFFLOAD\") and recompile."
        ) from exc
