"""telefuser-serve's cost on top of `Pipeline.run`, on the device: overhead per video, time to in_progress, and the
device's idle time between consecutive queued jobs.

    PYTHONPATH=. python3 bench/serve.py PLAN [--videos 3]
    # Wan2.1-1.3B 480p: `python3 bench/wan21_run.py` writes /tmp/wan21_random/plan.json (random weights, real shapes)

1. direct: `pipe.run(...)` then `Video.save(...)`, `--videos` times after one warm-up (median of each);
2. sequential through the service (a real uvicorn on 127.0.0.1, httpx polling every 10 ms): submission to
   `completed`; overhead per video = that median minus the direct run + save median; time to `in_progress` =
   the job's run start minus its submission (the worker's own clock);
3. back to back: `--videos` jobs submitted at once; the device is idle between two of them from the end of one
   job's `Pipeline.run` to the start of the next one's (the mp4 of the first is encoded by the writer thread
   meanwhile). Targets (issue 24): overhead under 1% of the video's time and under 50 ms to in_progress; idle
   under 100 ms. Writes $OUT/serve.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def environment() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    return f"{device}, PyTorch {torch.__version__}, Python {platform.python_version()}, {datetime.date.today()}"


def main(argv=None) -> int:
    import httpx
    import uvicorn

    import telefuser
    from bench.common import out_dir
    from telefuser.serve.server import Settings, build

    p = argparse.ArgumentParser()
    p.add_argument("plan")
    p.add_argument("--videos", type=int, default=3)
    p.add_argument("--prompt", default="a red fox running through fresh snow")
    args = p.parse_args(argv)
    pipe = telefuser.load_plan(args.plan)
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    pipe.run(prompt=args.prompt, seed=0, progress=False).save(folder / "warm.mp4")  # warm-up
    runs, saves = [], []
    for i in range(args.videos):
        start = time.perf_counter()
        video = pipe.run(prompt=args.prompt, seed=i, progress=False)
        runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        video.save(folder / f"direct{i}.mp4")
        saves.append(time.perf_counter() - start)

    app, manager = build(pipe, Settings(output_dir=folder / "served", max_queue=args.videos + 1))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    manager.start()
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)

    def wait(client, job_id):
        while client.get(f"/v1/videos/{job_id}").json()["status"] not in ("completed", "failed"):
            time.sleep(0.01)

    latencies, to_progress = [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(args.videos):
            start = time.perf_counter()
            job_id = client.post("/v1/videos", json={"prompt": args.prompt, "seed": i}).json()["id"]
            wait(client, job_id)
            latencies.append(time.perf_counter() - start)
            job = manager.get(job_id)
            to_progress.append(job.run_started - job.submitted_monotonic)
        ids = [client.post("/v1/videos", json={"prompt": args.prompt, "seed": i}).json()["id"]
               for i in range(args.videos)]
        for job_id in ids:
            wait(client, job_id)
    jobs = [manager.get(i) for i in ids]
    idle = [b.run_started - a.run_ended for a, b in zip(jobs, jobs[1:])]
    server.should_exit = True
    manager.shutdown()

    direct = statistics.median(runs) + statistics.median(saves)
    overhead = statistics.median(latencies) - direct
    lines = [
        f"Measured: {environment()}; plan {Path(args.plan).name}, {args.videos} videos each way.", "",
        "| quantity | value | target |", "|---|---|---|",
        f"| `Pipeline.run` (median) | {statistics.median(runs):.3f} s | |",
        f"| `Video.save` (median) | {statistics.median(saves):.3f} s | |",
        f"| through the service, submit to completed (median) | {statistics.median(latencies):.3f} s | |",
        f"| overhead per video | {overhead * 1000:.1f} ms ({100 * overhead / direct:.2f}% of the video's time) | < 1% |",
        f"| submit to in_progress (median, max) | {1000 * statistics.median(to_progress):.1f} ms, "
        f"{1000 * max(to_progress):.1f} ms | < 50 ms |",
        f"| device idle between queued jobs (median, max) | {1000 * statistics.median(idle):.2f} ms, "
        f"{1000 * max(idle):.2f} ms | < 100 ms |" if idle else "| device idle between queued jobs | (one video) | |",
    ]
    (out_dir() / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
