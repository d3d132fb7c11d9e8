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

from telefuser.errors import OutOfMemory, PlanError, WeightsError
from telefuser.schema.enums import ModelRole, WeightOffloadType
from telefuser.schema.model_config import ModelRuntimeConfig
from telefuser.schema.plan import ModelPlacement, Plan

from .io.params import RunParameters, resolve_parameters
from .io.video import Timings, Video
from .load.phases import LoadPhases
from .memory.offload import PrefetchSchedule
from .memory.placement import Placement, peak_memory, reset_peak_memory


# FSDP's unit per model class: its nn.ModuleList of blocks (WanDiT and UMT5Encoder: `.blocks`)
FSDP_BLOCKS = {"HunyuanVideo15DiT": "double_blocks", "Qwen25VLTextEncoder": "layers"}


def _parallelize(module: torch.nn.Module, placement: ModelPlacement, mesh, class_name: str) -> None:
    """The plan's parallelism on one loaded model: tp, then the sequence hooks (which see the local heads),
    then FSDP over all ranks (a HunyuanVideo-1.5 DiT with its own tp plan and sequence hooks)."""
    if placement.parallelized and class_name == "HunyuanVideo15DiT":
        from telefuser.distributed.parallelize_hy15 import parallelize_hy15_dit
        from telefuser.distributed.tensor_parallel_hy15 import apply_tensor_parallel_hy15

        apply_tensor_parallel_hy15(module, mesh)
        parallelize_hy15_dit(module, mesh)
    elif placement.parallelized:
        from telefuser.distributed.parallelize_wan import parallelize_wan_dit
        from telefuser.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(module, mesh)
        parallelize_wan_dit(module, mesh)
    if placement.sharded:
        from telefuser.distributed.fsdp import apply_fsdp

        apply_fsdp(module, mesh, FSDP_BLOCKS.get(class_name, "blocks"))


def check_before_load(plan: Plan) -> None:
    """What the runtime checks before joining ranks and loading: only what needs this machine or the weight files
    (every other refusal is the compiler's)."""
    from .plan_io import check_fingerprints, check_target

    check_target(plan)
    check_compiled_with_weights(plan)
    check_fingerprints(plan)


def check_compiled_with_weights(plan: Plan) -> None:
    """A plan of `compile_recipe(..., inspect_weights=False)` records no weights to load (telefuser-compile writes
    none: --no-weights is for --check only)."""
    if plan.memory.at.get("skipped") == "--no-weights":
        raise PlanError("the plan was compiled without its weights (--no-weights / inspect_weights=False), so it "
                        "records no weight files to load; compile the recipe with its weights.")


class Pipeline:
    """A loaded plan: call `run` once per video. Build it with `telefuser.load_plan`.

    On a plan of several ranks every rank builds its Pipeline (under `telefuser-run`, which starts the
    ranks, or torchrun); `run` returns the video on rank 0 and None elsewhere.
    """

    def __init__(self, plan: Plan, plan_path: str | Path = "<memory>", phases: LoadPhases | None = None) -> None:
        """`phases` (load_plan passes the one it started with reading the plan) records the load's phases;
        `load_phases` holds them afterwards."""
        from telefuser.distributed import rank as ranks
        from .load.build import build_model

        self.plan = plan
        self.plan_path = str(plan_path)
        self.load_phases = phases = phases or LoadPhases()
        with phases.phase("check plan"):
            check_before_load(plan)
        start = time.perf_counter()
        with phases.phase("join ranks"):
            self.rank = ranks.join(plan)  # refuses a launch that does not fit the plan before anything loads
        self.device = phases.device = self.rank.device
        self.placements: dict[str, Placement] = {}  # by model name
        self.prefetch = PrefetchSchedule(plan.memory.prefetch, self.placements, self.device)  # the plan's decisions
        self.tokenizers: dict[str, object] = {}
        text_len = plan.layer2_inference_config.text_len
        for planned in plan.layer1_model_definition.models:
            placement = plan.placement_of(planned.name)
            if placement.ranks == "replica_lead" and not self.rank.is_writer:
                continue
            if planned.role == ModelRole.TOKENIZER:
                with phases.phase(f"{planned.name}: read"):
                    self.tokenizers[planned.name] = _load_tokenizer(planned, text_len)
                continue
            runtime = plan.layer2_inference_config.models.get(planned.name, ModelRuntimeConfig())
            device = torch.device("cpu") if placement.compute_device == "cpu" else self.device
            blocks = plan.memory.block_plan(planned.name) if placement.streamed_blocks else None
            with _oom_guard(f"loading model {planned.name!r}"):
                # FSDP takes the model from the CPU and moves each rank's share of every block to the device;
                # block offload packs the streamed blocks from host memory and moves the rest.
                module = build_model(planned, runtime, torch.device("cpu") if placement.load_device == "cpu" else device,
                                     base_dir=Path(plan.recipe.path).parent, phases=phases)
                with phases.phase(f"{planned.name}: place"):
                    if self.rank.mesh is not None:
                        _parallelize(module, placement, self.rank.mesh, planned.class_)
                    self.placements[planned.name] = Placement(
                        module, device, placement.offload_type == WeightOffloadType.MODEL_CPU_OFFLOAD,
                        name=planned.name, pin=placement.pinned, schedule=self.prefetch,
                        loaded_on_device=placement.loaded_on_device, blocks=blocks)
        with phases.phase("warm up"):
            self._warm_up(plan)
        self.load_seconds = time.perf_counter() - start

    def _warm_up(self, plan: Plan) -> None:
        """Run, on an empty prompt, a text encoder the plan reads to the device at load (its decision's reason says
        so), so that the first video's stage pays no first-call setup (Triton compilation, library handles)."""
        from .stages.text_encode import encode_prompts

        for stage in plan.stages:
            if stage.kind != "text_encode":
                continue
            tokenizer, encoder = stage.models
            if encoder not in self.placements or not plan.placement_of(encoder).loaded_on_device:
                continue
            # the module is still on the tensors it was loaded with; not through active(), which would count this
            # as the use they were loaded for
            with torch.inference_mode(), self.dispatch(encoder):
                encode_prompts(self.placements[encoder].module, self.tokenizers[tokenizer], [""], self.device)
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
        if planned.class_ == "Qwen25VLTokenizer":  # HunyuanVideo-1.5: a plain `tokenizers` encode (stages/hy15_*)
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(path))
        return UMT5Tokenizer(path, text_len=text_len)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, and tokenizers' own Exception type
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
