"""Replicas on a Ray cluster: `telefuser-serve plan.json --ray [ADDRESS] --replicas N`.

Each replica is a Ray actor that loads the plan once (reserving the plan's devices on one node: a placement group
of one bundle holding all its GPUs, `STRICT_PACK`) and runs one job at a time. The front end (this process) keeps
the same HTTP API and the one queue: a worker thread per replica takes the oldest queued job whenever its replica
is free, so each job goes to a replica with nothing to do (the least loaded) and none waits behind a busy one.
The replica encodes the mp4 and returns its bytes; the front end writes them atomically under --output-dir, so
results are served from the front end whichever node made them, and no node is left with a partial file.

A replica that dies (its process killed, its node lost) fails its running job with the status `failed`, error
code `replica_died`, and is replaced by a new actor before its worker takes another job; the other replicas go
on serving. Progress and cancellation go through the actor's other threads (a threaded actor): the front end
polls the replica's step count, and a cancel makes the replica's step hook raise at the next step boundary.

Python entry point for an application of one's own: `ray_runners(plan_path, replicas)` gives runners for
`telefuser.serve.server.build(..., runner=runners)` (or `JobManager`).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Optional

from telefuser.errors import TeleFuserError

from .jobs import Cancelled

log = logging.getLogger("telefuser.serve")
POLL_SECONDS = 0.1


class ReplicaDied(TeleFuserError):
    """The Ray actor running a job died."""


class _Replica:
    """The actor's body: one loaded plan; `run` in one thread, `progress` / `cancel` answered from others."""

    def __init__(self, plan_path: str) -> None:
        import telefuser

        self.pipeline = telefuser.load_plan(plan_path)
        self.lock = threading.Lock()
        self.steps: dict[str, tuple[int, int]] = {}
        self.cancelled: set[str] = set()

    def ready(self) -> str:
        import os

        return f"pid {os.getpid()}"

    def run(self, token: str, values: dict) -> tuple[bytes, dict]:
        from telefuser.runtime.video import write_mp4_atomically

        def on_step(done: int, total: int) -> None:
            with self.lock:
                self.steps[token] = (done, total)
                if token in self.cancelled:
                    raise Cancelled()

        import tempfile

        try:
            video = self.pipeline.run(**values, progress=False, on_step=on_step)
            with tempfile.TemporaryDirectory(prefix="telefuser-replica-") as folder:
                path = Path(folder) / "video.mp4"
                write_mp4_atomically(path, video.frames, video.fps)
                data = path.read_bytes()
            t = video.timings
            return data, {"steps": list(t.steps), "peak_memory_bytes": t.peak_memory_bytes,
                          "peak_memory_kind": t.peak_memory_kind}
        finally:
            with self.lock:
                self.steps.pop(token, None)
                self.cancelled.discard(token)

    def progress(self, token: str) -> Optional[tuple[int, int]]:
        with self.lock:
            return self.steps.get(token)

    def cancel(self, token: str) -> None:
        with self.lock:
            self.cancelled.add(token)


class _Timings:
    def __init__(self, info: dict) -> None:
        self.steps = info.get("steps", [])
        self.peak_memory_bytes = info.get("peak_memory_bytes", 0)
        self.peak_memory_kind = info.get("peak_memory_kind", "")


class EncodedVideo:
    """A replica's finished mp4, saved by the front end (atomically, like Video.save)."""

    def __init__(self, data: bytes, info: dict) -> None:
        self.data = data
        self.timings = _Timings(info)

    def save(self, path: Path) -> Path:
        from telefuser.atomic import atomic_output

        with atomic_output(Path(path), suffix=".partial.mp4") as tmp:
            tmp.write_bytes(self.data)
        return Path(path)


def _resources(plan) -> dict:
    """What one replica reserves: the plan's GPUs (all on one node), or one CPU for a CPU plan."""
    world = plan.mesh.world_size
    if plan.device.startswith("cuda"):
        return {"num_gpus": world, "num_cpus": 1}
    return {"num_cpus": 1}


class RayReplica:
    """A runner (`runner(values, on_step) -> video`) backed by one Ray actor, replaced when it dies."""

    def __init__(self, plan_path: str, plan, index: int, ready_timeout: float = 600.0) -> None:
        self.plan_path, self.plan, self.index, self.ready_timeout = str(plan_path), plan, index, ready_timeout
        self.actor = None
        self.group = None
        self.generation = 0
        self.ready = threading.Event()  # cleared while a dead actor is being replaced
        self.replace_error: Optional[BaseException] = None
        self._start()
        self.ready.set()

    def _start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        resources = _resources(self.plan)
        bundle = {"CPU": resources["num_cpus"], **({"GPU": resources["num_gpus"]} if "num_gpus" in resources else {})}
        self.group = placement_group([bundle], strategy="STRICT_PACK")  # the plan's devices on one node
        ray.get(self.group.ready(), timeout=self.ready_timeout)
        actor_class = ray.remote(max_concurrency=4, **resources)(_Replica)
        self.actor = actor_class.options(
            name=None, scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.group),
        ).remote(self.plan_path)
        ray.get(self.actor.ready.remote(), timeout=self.ready_timeout)
        self.generation += 1
        log.info("replica %d ready (generation %d)", self.index, self.generation)

    def replace(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone
            pass
        try:
            remove_placement_group(self.group)
        except Exception:
            pass
        self._start()

    def __call__(self, values: dict, on_step) -> EncodedVideo:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        self.ready.wait()
        if self.replace_error is not None:  # the last replacement failed: try again now
            self.replace_error = None
            self.replace()
        token = f"{self.index}-{time.monotonic_ns()}"
        ref = self.actor.run.remote(token, values)
        seen = 0
        cancelled = False
        try:
            while True:
                ready, _ = ray.wait([ref], timeout=POLL_SECONDS)
                if ready:
                    data, info = ray.get(ref)
                    break
                try:
                    progress = ray.get(self.actor.progress.remote(token), timeout=30)
                except GetTimeoutError:
                    progress = None
                if progress is not None and not cancelled:
                    done, total = progress
                    try:
                        while seen < done:
                            seen += 1
                            on_step(seen, total)
                    except Cancelled:
                        cancelled = True
                        self.actor.cancel.remote(token)
        except RayActorError as exc:
            died = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._replace_later()
            raise ReplicaDied(f"replica {self.index} died while running this job ({died}); no video was written. "
                              "It is being replaced and the other replicas keep serving: submit the job again.") from exc
        except RayTaskError as exc:
            if cancelled or isinstance(getattr(exc, "cause", None), Cancelled):
                raise Cancelled() from exc
            cause = getattr(exc, "cause", None)
            if isinstance(cause, TeleFuserError):
                raise cause from exc
            raise
        if cancelled:
            raise Cancelled()
        if seen == 0 and info["steps"]:  # a job faster than one poll: report its steps now
            for i, _ in enumerate(info["steps"]):
                on_step(i + 1, len(info["steps"]))
        return EncodedVideo(data, info)

    def _replace_later(self) -> None:
        """Start a new actor at once, in the background; this replica's next job waits until it is ready."""
        self.ready.clear()
        threading.Thread(target=self._safe_replace, name=f"telefuser-replica-{self.index}-replace",
                         daemon=True).start()

    def _safe_replace(self) -> None:
        try:
            self.replace()
        except Exception as exc:
            log.exception("could not replace replica %d", self.index)
            self.replace_error = exc
        finally:
            self.ready.set()


def ray_runners(plan_path: str | Path, replicas: int, address: Optional[str] = None, plan=None) -> list[RayReplica]:
    """Start Ray (or join the cluster at `address`, "auto" for the local one) and `replicas` replica actors."""
    import ray

    if plan is None:
        from telefuser.runtime.plan_io import read_plan

        plan, _ = read_plan(plan_path)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    plan_path = str(Path(plan_path).resolve())
    return [RayReplica(plan_path, plan, i) for i in range(replicas)]

