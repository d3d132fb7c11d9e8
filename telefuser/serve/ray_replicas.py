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
    """The actor's body, one rank of a replica: the loaded plan; `run` in one thread, `progress` / `cancel` answered
    from others. For a plan of several ranks, each rank is an actor of the replica's placement group, joined to the
    others through MASTER_ADDR / MASTER_PORT (the address of rank 0's node)."""

    def __init__(self, plan_path: str, rank: int = 0, world: int = 1, master: Optional[tuple[str, int]] = None) -> None:
        import os

        import telefuser

        if world > 1:
            os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1])})
        self.rank, self.world = rank, world
        self.pipeline = telefuser.load_plan(plan_path)  # several ranks: returns once every rank joined
        self.lock = threading.Lock()
        self.steps: dict[str, tuple[int, int]] = {}
        self.cancelled: set[str] = set()

    def ready(self) -> str:
        import os

        return f"pid {os.getpid()}"

    def run(self, token: str, values: dict) -> Optional[tuple[bytes, dict]]:
        """The job on this rank; rank 0 returns (mp4 bytes, timings), the others None."""
        from telefuser.runtime.io.video import write_mp4_atomically

        def on_step(done: int, total: int) -> None:
            with self.lock:
                self.steps[token] = (done, total)
                cancel = token in self.cancelled
            if self.world > 1:  # the ranks agree: rank 0 was told, all stop at this step
                import torch
                import torch.distributed as dist

                flag = torch.tensor([int(cancel)], dtype=torch.int32, device=self.pipeline.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                cancel = bool(flag.item())
            if cancel:
                raise Cancelled()

        import tempfile

        try:
            video = self.pipeline.run(**values, progress=False, on_step=on_step)
            if video is None:
                return None
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


def _rank_resources(plan) -> dict:
    """What one rank of a replica reserves: one GPU of the plan's (all of a replica's on one node), or one CPU."""
    return {"num_gpus": 1, "num_cpus": 1} if plan.device.startswith("cuda") else {"num_cpus": 1}


def _address() -> tuple[str, int]:
    """This node's address and a free port on it: rank 0's rendezvous for the replica's other ranks."""
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        return ray.util.get_node_ip_address(), sock.getsockname()[1]


class RayReplica:
    """A runner (`runner(values, on_step) -> video`) backed by one replica: an actor per rank of the plan, in one
    placement group; all replaced when one dies."""

    def __init__(self, plan_path: str, plan, index: int, ready_timeout: float = 600.0) -> None:
        self.plan_path, self.plan, self.index, self.ready_timeout = str(plan_path), plan, index, ready_timeout
        self.actors: list = []
        self.group = None
        self.generation = 0
        self.ready = threading.Event()  # cleared while a dead replica is being replaced
        self.replace_error: Optional[BaseException] = None
        self._start()
        self.ready.set()

    @property
    def actor(self):
        """Rank 0's actor (it returns the video)."""
        return self.actors[0]

    def _start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = self.plan.mesh.world_size
        resources = _rank_resources(self.plan)
        bundle = {"CPU": resources["num_cpus"], **({"GPU": resources["num_gpus"]} if "num_gpus" in resources else {})}
        self.group = placement_group([bundle] * world, strategy="STRICT_PACK")  # the plan's devices on one node
        ray.get(self.group.ready(), timeout=self.ready_timeout)

        def in_bundle(i: int):
            return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=i)

        master = None
        if world > 1:
            master = ray.get(ray.remote(num_cpus=0)(_address).options(scheduling_strategy=in_bundle(0)).remote(),
                             timeout=self.ready_timeout)
        actor_class = ray.remote(max_concurrency=4, **resources)(_Replica)
        self.actors = [actor_class.options(scheduling_strategy=in_bundle(rank)).remote(self.plan_path, rank, world,
                                                                                        master)
                       for rank in range(world)]
        ray.get([a.ready.remote() for a in self.actors], timeout=self.ready_timeout)
        self.generation += 1
        log.info("replica %d ready (generation %d, %d rank(s))", self.index, self.generation, world)

    def replace(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
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
        refs = [actor.run.remote(token, values) for actor in self.actors]
        seen = 0
        cancelled = False
        try:
            while True:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_SECONDS)
                results = [ray.get(ref) for ref in ready]  # raises at once for a rank that died or failed
                if len(ready) == len(refs):
                    data, info = results[ready.index(refs[0])]
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
            if len(self.actors) > 1 and not isinstance(cause, TeleFuserError):
                # a rank's collective broke (a peer died, or failed alone and left the others waiting): the replica
                # cannot go on in step, so it is started afresh
                self._replace_later()
                first = str(cause or exc).strip().splitlines()[0][:300]
                raise ReplicaDied(f"replica {self.index} died while running this job (one of its ranks failed: "
                                  f"{first}); no video was written. It is being replaced and the other replicas "
                                  "keep serving: submit the job again.") from exc
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

