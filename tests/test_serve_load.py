"""A bounded load test against telefuser-serve on 127.0.0.1 (fixed request count, a time limit, stops by itself):
every request served despite a small queue (429s honoured), throughput and p50/p95 reported; and the gap between
consecutive jobs on the worker (the device idle between queued jobs) measured."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from test_serve import live_server, pipe, plans  # noqa: E402,F401 (pipe and plans: the fixtures it uses)

from bench.serve_load import run_load  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def test_bounded_load_on_loopback(pipe, tmp_path):  # noqa: F811
    with live_server(pipe, tmp_path, max_queue=2) as (url, manager):
        report = run_load(url, requests=4, concurrency=4, time_limit=240)
        jobs = sorted(manager.jobs.values(), key=lambda j: j.run_started)
    print("\nload test:", report)
    assert report["completed"] == 4 and report["failed"] == report["unfinished"] == report["refused"] == 0
    assert report["rejected_429"] >= 1  # 4 at once against 1 running + 2 queued: one waited for Retry-After
    assert report["p50_s"] <= report["p95_s"] and report["videos_per_minute"] > 0
    # queued jobs follow each other on the worker without waiting for the previous one's mp4 encode
    gaps = [b.run_started - a.run_ended for a, b in zip(jobs, jobs[1:]) if b.submitted_monotonic < a.run_ended]
    print("gaps between consecutive queued jobs (s):", [round(g, 4) for g in gaps])
    assert gaps and max(gaps) < 0.5


def test_refuses_other_addresses():
    with pytest.raises(SystemExit, match="loopback"):
        run_load("http://10.0.0.1:8000", requests=1)
