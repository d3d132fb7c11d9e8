"""A bounded load test of a running telefuser-serve: a fixed number of requests from a few client threads, a time
limit, loopback addresses only; reports throughput and the p50 / p95 latency from submission to completion.

    python -m bench.serve_load http://127.0.0.1:8000 --requests 16 --concurrency 4 --time-limit 600 [--api-key KEY]

A 429 is honoured (the client waits `Retry-After`, within the time limit) and counted. It stops by itself: when every
request finished, or at the time limit (unfinished requests are reported as such, not waited for).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import threading
import time
from urllib.parse import urlparse


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


def run_load(base_url: str, requests: int = 8, concurrency: int = 4, time_limit: float = 300.0,
             api_key: str | None = None, body: dict | None = None, poll: float = 0.05) -> dict:
    """Submit `requests` jobs from `concurrency` threads and wait for each; returns the report as a dict."""
    import httpx

    if not _loopback(base_url):
        raise SystemExit(f"refusing {base_url}: this load test only targets loopback addresses (127.0.0.1, ::1)")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = body or {"prompt": "a load test"}
    deadline = time.monotonic() + time_limit
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    outcome = {"completed": 0, "failed": 0, "unfinished": 0, "rejected_429": 0, "refused": 0}

    def take() -> int | None:
        with lock:
            if next_index[0] >= requests:
                return None
            next_index[0] += 1
            return next_index[0] - 1

    def client_thread() -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
            while (index := take()) is not None:
                start = time.monotonic()
                while True:
                    if time.monotonic() > deadline:
                        with lock:
                            outcome["unfinished"] += 1
                        break
                    r = client.post("/v1/videos", json={**body, "seed": index})
                    if r.status_code == 429:
                        with lock:
                            outcome["rejected_429"] += 1
                        time.sleep(min(float(r.headers.get("Retry-After", "1")), max(0.0, deadline - time.monotonic())))
                        continue
                    if r.status_code != 200:
                        with lock:
                            outcome["refused"] += 1
                        break
                    job_id = r.json()["id"]
                    status = "queued"
                    while time.monotonic() < deadline:
                        status = client.get(f"/v1/videos/{job_id}").json()["status"]
                        if status in ("completed", "failed"):
                            break
                        time.sleep(poll)
                    with lock:
                        if status == "completed":
                            outcome["completed"] += 1
                            latencies.append(time.monotonic() - start)
                        elif status == "failed":
                            outcome["failed"] += 1
                        else:
                            outcome["unfinished"] += 1
                    break

    began = time.monotonic()
    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 35)  # a request in flight ends within its 30 s timeout
    wall = time.monotonic() - began
    return {"requests": requests, "concurrency": concurrency, **outcome, "wall_s": round(wall, 3),
            "videos_per_minute": round(60 * outcome["completed"] / wall, 3) if wall else 0.0,
            "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3),
            "mean_s": round(statistics.fmean(latencies), 3) if latencies else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=300.0)
    p.add_argument("--api-key")
    p.add_argument("--prompt", default="a load test")
    args = p.parse_args(argv)
    report = run_load(args.url, args.requests, args.concurrency, args.time_limit, args.api_key, {"prompt": args.prompt})
    print(json.dumps(report, indent=2))
    return 0 if report["completed"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
