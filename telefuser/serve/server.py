"""Run the service: one plan loaded once, a job worker, uvicorn on the chosen address.

SIGTERM / SIGINT: the service stops taking jobs at once (503), uvicorn closes its connections, the queued jobs
fail as cancelled, and the running one is cancelled at its next denoising step (or, with `drain`, finished);
then `serve` returns 143 / 130. No partial mp4 is left: outputs are written atomically and a cancelled job's
file is removed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from telefuser.errors import TeleFuserError

from .app import Limits, create_app
from .jobs import JobManager
from .params import plan_name

LOOPBACK_NAMES = ("localhost",)


class ServeError(TeleFuserError):
    """A service setting that cannot be used (an open address without a key, a bad folder, ...)."""


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    output_dir: Path = Path("telefuser-videos")
    max_queue: int = 16
    keep_seconds: float = 3600.0
    drain: bool = False
    limits: Limits = Limits()
    log_level: str = "info"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_settings(settings: Settings) -> None:
    """Refuse what would let anyone in: a non-loopback address without a key; and bad numbers."""
    if not is_loopback(settings.host) and not settings.api_key:
        raise ServeError(
            f"--host {settings.host} would accept requests from other machines, and no API key is set; pass "
            "--api-key KEY (or set TELEFUSER_API_KEY) so that every request must carry 'Authorization: Bearer KEY', "
            "or keep the default --host 127.0.0.1.")
    if settings.api_key is not None and len(settings.api_key) < 8:
        raise ServeError("the API key is shorter than 8 characters; use a long random one, e.g. "
                         "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`.")
    if settings.max_queue < 1:
        raise ServeError(f"--max-queue {settings.max_queue}: the queue must hold at least one job.")
    if settings.keep_seconds <= 0:
        raise ServeError(f"--keep-seconds {settings.keep_seconds:g}: finished videos must be kept a while (> 0).")
    folder = Path(settings.output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            probe = folder / ".telefuser-serve-probe"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as exc:
        raise ServeError(f"--output-dir {str(folder)!r} is not a writable folder ({exc.strerror or exc}); choose "
                         "another.") from exc


def check_plan(plan) -> None:
    """Plans the service runs: one rank, or several ranks of one dp replica (rank 0 leads, telefuser.serve.ranks)."""
    dp = plan.mesh.degrees.get("dp", 1)
    if dp > 1:
        raise ServeError(f"the plan has dp_degree {dp}: telefuser-serve runs one replica per plan (its ranks run each "
                         "job together); recompile with dp_degree 1 and start several services, or use --ray "
                         "--replicas.")


def pipeline_runner(pipeline):
    """The one-machine runner: the loaded plan's Pipeline, quietly, with the step hook."""
    def run(values: dict, on_step):
        return pipeline.run(**values, progress=False, on_step=on_step)
    return run


def build(source, settings: Settings, runner=None):
    """(asgi app, JobManager) for a loaded Pipeline (run in this process) or a Plan with `runner` (one runner, or a
    list of them: replicas); the manager is not started."""
    plan = getattr(source, "plan", source)
    check_plan(plan)
    if runner is None:
        if plan.mesh.world_size > 1:  # this process is rank 0 of the plan's ranks
            from .ranks import RankLeader

            runner = RankLeader(source)
        else:
            runner = pipeline_runner(source)
    manager = JobManager(runner, plan_name(plan), Path(settings.output_dir),
                         max_queue=settings.max_queue, keep_seconds=settings.keep_seconds)
    return create_app(plan, manager, settings.api_key, settings.limits), manager


class _Server:
    """uvicorn's Server, told of the first SIGINT/SIGTERM (to stop taking jobs at once) and of a second one (to cancel
    the running job instead of draining it), and not re-raising the signal at the end (the caller returns 128 +
    signal, after the worker is done)."""

    def __new__(cls, config, on_signal, on_second_signal):
        import uvicorn

        class Server(uvicorn.Server):
            signum: Optional[int] = None

            def handle_exit(self, sig, frame):
                if self.signum is None:
                    self.signum = sig
                    on_signal()
                else:  # a second signal: stop draining
                    on_second_signal()
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        return Server(config)


def serve(source, settings: Settings, sock: Optional[socket.socket] = None, runner=None) -> int:
    """Serve a loaded Pipeline (or a Plan with its runners) until SIGINT/SIGTERM; returns 0, or 128 + the signal."""
    import uvicorn

    check_settings(settings)
    app, manager = build(source, settings, runner)
    plan = getattr(source, "plan", source)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, access_log=settings.log_level == "debug")
    server = _Server(config, manager.stop_accepting, manager.cancel_running)
    manager.start()
    logging.getLogger("telefuser.serve").info(
        "serving plan %r on http://%s:%d with %d replica(s) (%s)", plan_name(plan), settings.host, settings.port,
        len(manager.runners),
        "API key required" if settings.api_key else "no API key: loopback only")
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        with _second_signal_cancels(manager):  # while draining, another SIGTERM / SIGINT cancels the running job
            manager.shutdown(drain=settings.drain)
    return 128 + server.signum if server.signum is not None else 0


@contextlib.contextmanager
def _second_signal_cancels(manager: JobManager):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def cancel(signum, frame):
        logging.getLogger("telefuser.serve").warning("signal %d while stopping: cancelling the running job(s)", signum)
        manager.cancel_running()

    previous = {sig: signal.signal(sig, cancel) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
