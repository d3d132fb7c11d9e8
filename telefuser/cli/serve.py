"""`telefuser-serve PLAN [--host 127.0.0.1] [--port 8000]`: an HTTP video service for one plan (docs/serve.md).

Thin: parse, check, load the plan once, serve. Bad input (a bad plan, an open address without a key, an
unwritable folder) is one paragraph and exit 2; SIGTERM ends it with 143 after the running job is cancelled
(or, with --drain, finished), leaving no partial file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from telefuser.cli.errors import exit_now_if_interrupted, exiting_on_signals, guarded, report

PROG = "telefuser-serve"
EPILOG = """API (OpenAI's video API, so the openai client works with base_url="http://HOST:PORT/v1"):
  POST /v1/videos  GET /v1/videos[/{id}[/content]]  DELETE /v1/videos/{id}  GET /healthz  GET /metrics
  GET /  (a page generated from the plan)   GET /docs, /openapi.json  (this plan's request fields)

security: binds 127.0.0.1 by default; any other address needs --api-key (or TELEFUSER_API_KEY), then checked
as 'Authorization: Bearer KEY' on every endpoint but /healthz, the page and /docs, /openapi.json (they describe
only this plan's parameters; Swagger UI's Authorize sends the key).

exit codes: 0 stopped; 2 bad input (one paragraph); 130 / 143 stopped by SIGINT / SIGTERM."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve a compiled TeleFuser plan over HTTP.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", help="a plan JSON written by telefuser-compile")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $TELEFUSER_API_KEY)")
    p.add_argument("--output-dir", default="telefuser-videos", help="folder of the finished mp4s (created)")
    p.add_argument("--max-queue", type=int, default=16, help="jobs that may wait; more get 429 (default 16)")
    p.add_argument("--keep-seconds", type=float, default=3600.0,
                   help="finished jobs and their mp4s are removed this long after they finish (default 3600)")
    p.add_argument("--drain", action="store_true",
                   help="on SIGTERM finish the running job (default: cancel it at its next step)")
    p.add_argument("--max-body-mb", type=float, default=24.0, help="largest request body, MiB (413 above)")
    p.add_argument("--max-image-mb", type=float, default=16.0, help="largest uploaded image, MiB (413 above)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the plan on Ray actors (replicas): a new local Ray instance, or the cluster at ADDRESS "
                        "('auto': the one this node belongs to); this process is then only the front end")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas, each with the plan's devices on one "
                                                          "node (default 1)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    with exiting_on_signals():  # while loading: SIGINT/SIGTERM unwind (130/143); the server installs its own
        code = guarded(PROG, lambda: _main(list(sys.argv[1:] if argv is None else argv)))
    return exit_now_if_interrupted(code) if argv is None else code


def _main(argv: list[str]) -> int:  # noqa: C901
    args = build_parser().parse_args(argv)
    try:
        from telefuser.serve.app import Limits
        from telefuser.serve.server import Settings, check_settings, serve
    except ImportError as exc:
        return report(PROG, f"the service needs its optional dependencies ({exc.name} is missing); install them with "
                            "pip install 'telefuser[serve]'.")
    import telefuser

    settings = Settings(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("TELEFUSER_API_KEY") or None,
        output_dir=Path(args.output_dir), max_queue=args.max_queue, keep_seconds=args.keep_seconds, drain=args.drain,
        limits=Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20)),
        log_level=args.log_level)
    check_settings(settings)  # before the plan loads: a refused address costs nothing
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    if args.ray is not None:
        return _serve_on_ray(args, settings, serve)
    if args.replicas != 1:
        return report(PROG, f"--replicas {args.replicas} needs --ray (one machine runs one replica).")
    from telefuser.runtime.plan_io import check_plan_hash, read_plan
    from telefuser.serve.server import check_plan

    plan, raw = read_plan(args.plan)
    check_plan_hash(plan, raw, args.plan)
    check_plan(plan)
    rank = int(os.environ.get("RANK", "0"))
    if plan.mesh.world_size > 1 and "RANK" not in os.environ:
        # Start the plan's ranks here (each runs this command); rank 0 serves, the others follow it. With --drain
        # the launcher waits for the running job after forwarding SIGTERM.
        from telefuser.distributed.launch import run_local_ranks

        return run_local_ranks([sys.executable, "-m", "telefuser.cli.serve", *argv], plan.mesh.world_size,
                               grace_seconds=3600.0 if args.drain else 60.0)
    pipeline = telefuser.load_plan(args.plan)
    try:
        if rank != 0:
            from telefuser.serve.ranks import follow

            return follow(pipeline)
        if plan.mesh.world_size == 1:
            return serve(pipeline, settings)
        from telefuser.serve.ranks import RankLeader

        leader = RankLeader(pipeline)
        code = 1
        try:
            code = serve(pipeline, settings, runner=leader)
        finally:
            leader.stop(code)  # the followers end with the service's exit code
        return code
    finally:
        pipeline.close()


def _serve_on_ray(args, settings, serve) -> int:
    from telefuser.runtime.plan_io import check_plan_hash, read_plan
    from telefuser.serve.server import check_plan

    if args.replicas < 1:
        return report(PROG, f"--replicas {args.replicas}: at least one replica is needed.")
    try:
        import ray
    except ImportError:
        return report(PROG, "--ray needs Ray: pip install 'telefuser[serve]' (or pip install ray).")
    from telefuser.serve.ray_replicas import ray_runners

    plan, raw = read_plan(args.plan)
    check_plan_hash(plan, raw, args.plan)
    check_plan(plan)
    runners = ray_runners(args.plan, args.replicas, address=args.ray or None, plan=plan)
    try:
        return serve(plan, settings, runner=runners)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
