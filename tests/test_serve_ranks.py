"""telefuser-serve on a 2-rank tiny plan (cfg parallel on gloo): rank 0 serves and leads, rank 1 follows; the video
is the one-rank video, a running job cancelled stops on both ranks and the next job runs, SIGTERM ends both (143)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from telefuser.compiler import compile_recipe  # noqa: E402
from telefuser.schema.canonical import pretty_json  # noqa: E402

from test_serve import _free_port, decode_mp4, files_in  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def test_two_rank_plan_served_cancel_and_sigterm(tmp_path):
    plan = tmp_path / "cfg2.plan.json"
    overrides = ["target.num_devices=2", "layer2.parallel_config.cfg_degree=2", "layer2.num_inference_steps=24"]
    plan.write_text(pretty_json(compile_recipe(ROOT / "recipes" / "tiny.toml", overrides)
                                .model_dump(mode="json", by_alias=True)))
    port, out = _free_port(), tmp_path / "videos"
    cmd = [sys.executable, "-m", "telefuser.cli.serve", str(plan), "--port", str(port), "--output-dir", str(out),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        doomed = httpx.post(url + "/v1/videos", json={"prompt": "a cat", "seed": 7}).json()["id"]
        while httpx.get(f"{url}/v1/videos/{doomed}").json()["progress"] < 5:
            time.sleep(0.02)
        assert httpx.delete(f"{url}/v1/videos/{doomed}").json()["deleted"]
        job = httpx.post(url + "/v1/videos", json={"prompt": "a cat", "seed": 7}).json()["id"]
        deadline = time.time() + 180
        while (state := httpx.get(f"{url}/v1/videos/{job}").json())["status"] not in ("completed", "failed"):
            assert time.time() < deadline
            time.sleep(0.05)
        assert state["status"] == "completed", state
        served = decode_mp4(httpx.get(f"{url}/v1/videos/{job}/content").content, tmp_path, "served.mp4")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 143, proc.stderr.read()
    assert [n for n in files_in(out) if n.endswith(".mp4")] and not [n for n in files_in(out) if n.startswith(".")]
    # the one-rank video of the same plan settings (cfg on one rank), through the same encoder
    one = compile_recipe(ROOT / "recipes" / "tiny.toml", ["layer2.num_inference_steps=24"])
    one_path = tmp_path / "one.plan.json"
    one_path.write_text(pretty_json(one.model_dump(mode="json", by_alias=True)))
    import telefuser

    telefuser.load_plan(str(one_path)).run(prompt="a cat", seed=7, progress=False).save(tmp_path / "one.mp4")
    reference = decode_mp4((tmp_path / "one.mp4").read_bytes(), tmp_path, "one_copy.mp4")
    assert served.shape == reference.shape
    assert np.abs(served.astype(int) - reference.astype(int)).max() <= 2
