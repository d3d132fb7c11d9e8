"""The job queue: jobs run one at a time, in order, in a worker thread; their mp4s are written atomically.

A job is queued, then in_progress, then completed (its mp4 under the output folder) or failed (its error the
paragraph telefuser-run would print). Deleting a queued job drops it; deleting a running one sets its cancel
flag, which the denoising loop's `on_step` hook turns into `Cancelled` at the next step boundary (a cancel during
decoding is honoured before the write, or the written file is removed). Finished jobs and their files are
removed `keep_seconds` after they finish. Job ids are random (`secrets.token_hex`) and never touch the file
system: each output gets a name of its own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from telefuser.errors import TeleFuserError

from .params import JobRequest

log = logging.getLogger("telefuser.serve")

# runner(values, on_step) -> Video: `Pipeline.run(**values, progress=False, on_step=on_step)` on one machine.
Runner = Callable[[dict, Callable[[int, int], None]], Any]
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Cancelled(Exception):
    """Raised from the step hook when a job was cancelled: unwinds the run at a step boundary."""


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The service is shutting down and takes no new jobs."""


@dataclass
class Job:
    id: str
    request: JobRequest
    model: str
    created_at: int
    status: str = "queued"
    progress: int = 0
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    error: Optional[dict] = None
    path: Optional[Path] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    finished_monotonic: Optional[float] = None
    replica: Optional[int] = None  # the index of the replica that ran it
    attempts: int = 0  # runs again after its replica died
    # time.monotonic() when submitted, when its run started and ended on the replica (bench/serve.py reads them)
    submitted_monotonic: float = field(default_factory=time.monotonic)
    run_started: Optional[float] = None
    run_ended: Optional[float] = None

    def public(self) -> dict:
        """The OpenAI video object."""
        return {
            "id": self.id, "object": "video", "status": self.status, "progress": self.progress,
            "created_at": self.created_at, "completed_at": self.completed_at, "expires_at": self.expires_at,
            "model": self.model, "size": self.request.size, "seconds": self.request.seconds,
            "prompt": self.request.prompt, "error": self.error, "remixed_from_video_id": None,
        }


class Metrics:
    """Counters for /metrics (Prometheus text format)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished = collections.Counter()  # completed / failed / cancelled
        self.rejected = collections.Counter()  # queue_full / invalid / shutting_down
        self.step_buckets = [0] * len(STEP_BUCKETS)
        self.step_count = 0
        self.step_sum = 0.0
        self.job_seconds_sum = 0.0
        self.job_count = 0
        self.peak_memory_bytes = 0
        self.peak_memory_kind = ""

    def step(self, seconds: float) -> None:
        with self.lock:
            self.step_count += 1
            self.step_sum += seconds
            for i, bound in enumerate(STEP_BUCKETS):
                if seconds <= bound:
                    self.step_buckets[i] += 1

    def mean_job_seconds(self) -> float:
        with self.lock:
            return self.job_seconds_sum / self.job_count if self.job_count else 0.0


class JobManager:
    """Queue, worker thread, retention. Thread-safe; the HTTP handlers call submit / get / list / delete."""

    def __init__(self, runner: Runner | list[Runner], model: str, output_dir: Path, max_queue: int = 16,
                 keep_seconds: float = 3600.0, clock: Callable[[], float] = time.time) -> None:
        # One worker thread per runner (a replica): each takes the oldest queued job when it is free, so a job
        # goes to a replica with nothing running, the least loaded, and every replica runs one job at a time.
        self.runners = list(runner) if isinstance(runner, (list, tuple)) else [runner]
        self.model = model
        self.output_dir = Path(output_dir)
        self.max_queue = max_queue
        self.keep_seconds = keep_seconds
        self.clock = clock
        self.metrics = Metrics()
        self.jobs: dict[str, Job] = {}  # every job not yet removed, in submission order
        self.queue: collections.deque[str] = collections.deque()
        self.running: dict[int, Job] = {}  # by replica index
        self.accepting = True
        self.lock = threading.Condition()
        self.stopped = threading.Event()
        self.workers: list[threading.Thread] = []
        self.writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="telefuser-serve-writer")
        self.writing = 0  # jobs whose mp4 is being written
        self.janitor: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for index, runner in enumerate(self.runners):
            worker = threading.Thread(target=self._work, args=(index, runner), name=f"telefuser-serve-worker-{index}",
                                      daemon=True)
            worker.start()
            self.workers.append(worker)
        self.janitor = threading.Thread(target=self._sweep_loop, name="telefuser-serve-janitor", daemon=True)
        self.janitor.start()

    def stop_accepting(self) -> None:
        with self.lock:
            self.accepting = False

    def cancel_running(self) -> None:
        """Cancel the running jobs at their next step (a second signal while draining)."""
        for job in list(self.running.values()):
            job.cancel.set()

    def shutdown(self, drain: bool = False, timeout: Optional[float] = None) -> None:
        """Take no more jobs; fail the queued ones; finish (drain) or cancel the running one; stop the threads."""
        with self.lock:
            self.accepting = False
            if self.queue or self.running:
                log.info("stopping: %d queued job(s) cancelled, %d running job(s) %s", len(self.queue),
                         len(self.running), "finishing (--drain)" if drain else "cancelled at their next step")
            while self.queue:
                job = self.jobs.get(self.queue.popleft())
                if job is not None:
                    self._finish(job, "failed", error={"code": "cancelled", "message": "the service shut down "
                                                       "before this job started; submit it again."})
            if not drain:
                for job in self.running.values():
                    job.cancel.set()
            self.stopped.set()
            self.lock.notify_all()
        for worker in self.workers:
            worker.join(timeout)
        self.writer.shutdown(wait=True)
        if self.janitor is not None:
            self.janitor.join(timeout)

    # -- the API's operations -------------------------------------------------------------------------------
    def submit(self, request: JobRequest) -> Job:
        with self.lock:
            if not self.accepting:
                self.metrics.rejected["shutting_down"] += 1
                raise NotAccepting()
            if len(self.queue) >= self.max_queue:
                self.metrics.rejected["queue_full"] += 1
                raise QueueFull(self._retry_after())
            job = Job(id="video_" + secrets.token_hex(16), request=request, model=self.model,
                      created_at=int(self.clock()))
            self.jobs[job.id] = job
            self.queue.append(job.id)
            self.lock.notify_all()
            return job

    def get(self, job_id: str) -> Optional[Job]:
        with self.lock:
            return self.jobs.get(job_id)

    def list(self, after: Optional[str] = None, limit: int = 20, order: str = "desc") -> tuple[list[Job], bool]:
        with self.lock:
            jobs = list(self.jobs.values())
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        return jobs[:limit], len(jobs) > limit

    def delete(self, job_id: str) -> bool:
        """Remove a job: a queued one is dropped, a running one cancelled at its next step, a finished one's file
        removed. False when there is no such job."""
        with self.lock:
            job = self.jobs.pop(job_id, None)
            if job is None:
                return False
            if job.status == "queued":
                try:
                    self.queue.remove(job_id)
                except ValueError:
                    pass
                self.metrics.finished["cancelled"] += 1
            elif job.status == "in_progress":
                job.cancel.set()  # the worker counts it and removes anything it wrote
            self.lock.notify_all()
        job.cancel.set()
        if job.path is not None:
            job.path.unlink(missing_ok=True)
        return True

    def counts(self) -> dict[str, int]:
        with self.lock:
            counts = collections.Counter(job.status for job in self.jobs.values())  # writing: in_progress
        return {state: counts.get(state, 0) for state in ("queued", "in_progress", "completed", "failed")}

    def queue_depth(self) -> int:
        with self.lock:
            return len(self.queue)

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: one job's mean time (at least 1 s)."""
        return max(1, int(round(self.metrics.mean_job_seconds() or 1.0)))

    # -- the worker -----------------------------------------------------------------------------------------
    def _work(self, index: int, runner: Runner) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.stopped.is_set():
                    self.lock.wait()
                if not self.queue:
                    return  # stopped, nothing left
                job = self.jobs.get(self.queue.popleft())
                if job is None:
                    continue
                job.status = "in_progress"
                job.run_started = time.monotonic()
                job.replica = index
                self.running[index] = job
            try:
                self._run(job, runner)
            finally:
                with self.lock:
                    self.running.pop(index, None)

    def busy(self) -> bool:
        with self.lock:
            return bool(self.running or self.queue or self.writing)

    def _run(self, job: Job, runner: Runner) -> None:
        start = time.perf_counter()

        def on_step(done: int, total: int) -> None:
            job.progress = min(99, int(100 * done / max(total, 1)))
            if job.cancel.is_set():
                raise Cancelled()

        try:
            try:
                video = runner(job.request.values, on_step)
            finally:
                job.run_ended = time.monotonic()
            if job.cancel.is_set():
                raise Cancelled()
        except BaseException as exc:  # noqa: B036 (KeyboardInterrupt does not reach a worker thread)
            self._failed(job, exc)
            return
        for seconds in getattr(getattr(video, "timings", None), "steps", []):  # the runtime's own step times
            self.metrics.step(seconds)
        # The mp4 is encoded by the writer thread while this worker starts the next job: the device is not left
        # idle during the encode. The job stays in_progress (99%) until its file is complete.
        with self.lock:
            self.writing += 1
        self.writer.submit(self._write, job, video, start)

    def _write(self, job: Job, video, start: float) -> None:
        path = self.output_dir / f"{secrets.token_hex(16)}.mp4"  # never the job id
        try:
            try:
                video.save(path)  # atomic: a temporary file beside it, renamed once complete
                if job.cancel.is_set():
                    raise Cancelled()
            except BaseException as exc:  # noqa: B036
                path.unlink(missing_ok=True)
                self._failed(job, exc)
                return
            with self.metrics.lock:
                self.metrics.job_seconds_sum += time.perf_counter() - start
                self.metrics.job_count += 1
                timings = getattr(video, "timings", None)
                if timings is not None and timings.peak_memory_bytes >= self.metrics.peak_memory_bytes:
                    self.metrics.peak_memory_bytes = timings.peak_memory_bytes
                    self.metrics.peak_memory_kind = timings.peak_memory_kind
            job.path = path
            self._finish(job, "completed")
            if job.cancel.is_set():  # deleted in the last instant
                path.unlink(missing_ok=True)
        finally:
            with self.lock:
                self.writing -= 1

    def _failed(self, job: Job, exc: BaseException) -> None:
        if type(exc).__name__ == "ReplicaDied" and job.request.retry and job.attempts == 0 and not job.cancel.is_set():
            with self.lock:
                if job.id in self.jobs and self.accepting:  # once more, first in line
                    job.attempts += 1
                    job.status, job.progress, job.replica = "queued", 0, None
                    self.queue.appendleft(job.id)
                    self.lock.notify_all()
                    log.warning("job %s: its replica died; running it again (retry_if_replica_dies)", job.id)
                    return
        if isinstance(exc, Cancelled):
            reason = "deleted while running" if job.id not in self.jobs else "the service shut down while it ran"
            self._finish(job, "failed", error={"code": "cancelled", "message": f"cancelled: {reason}; no video "
                                               "was written."}, cancelled=True)
        elif isinstance(exc, TeleFuserError):  # a bad image, out of memory, a full disk: this job fails alone
            self._finish(job, "failed", error={"code": _code(exc), "message": str(exc)})
            _free_device_memory()
        elif isinstance(exc, Exception):  # a bug or a device fault: reported on the job, logged with its traceback
            log.error("job %s failed:\n%s", job.id, "".join(traceback.format_exception(exc)))
            self._finish(job, "failed", error={"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
            _free_device_memory()
        else:
            raise exc

    def _finish(self, job: Job, status: str, error: Optional[dict] = None, cancelled: bool = False) -> None:
        now = self.clock()
        job.error = error
        job.completed_at = int(now)
        job.expires_at = int(now + self.keep_seconds)
        job.finished_monotonic = time.monotonic()
        if status == "completed":
            job.progress = 100
        job.status = status
        self.metrics.finished["cancelled" if cancelled else status] += 1

    # -- retention ------------------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Remove finished jobs (and their files) older than keep_seconds."""
        now = time.monotonic()
        with self.lock:
            old = [j for j in self.jobs.values()
                   if j.finished_monotonic is not None and now - j.finished_monotonic >= self.keep_seconds]
            for job in old:
                del self.jobs[job.id]
        for job in old:
            if job.path is not None:
                job.path.unlink(missing_ok=True)

    def _sweep_loop(self) -> None:
        interval = min(max(self.keep_seconds / 4, 0.05), 30.0)
        while not self.stopped.wait(interval):
            self.sweep()
        self.sweep()


def _code(exc: TeleFuserError) -> str:
    name = type(exc).__name__
    return {"ParameterError": "invalid_parameter", "OutOfMemory": "out_of_memory",
            "OutputPathError": "output_error", "ReplicaDied": "replica_died"}.get(name, "run_error")


def _free_device_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
