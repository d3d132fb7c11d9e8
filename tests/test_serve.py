"""telefuser-serve on the tiny plans: the OpenAI video API through the official `openai` client and raw HTTP, the
request model generated from Layer 3, the queue (order, 429, cancel queued and running), limits and the API key,
the page at `/`, and SIGTERM in a real process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import telefuser  # noqa: E402
from telefuser.compiler import compile_recipe  # noqa: E402
from telefuser.schema.canonical import pretty_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
KEY = "test-key-0123456789"
pytestmark = pytest.mark.timeout(300)


def _write_plan(folder: Path, recipe: str, overrides=()) -> Path:
    plan = compile_recipe(RECIPES / recipe, overrides)
    path = folder / f"{plan.recipe.name}-{len(overrides)}.plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return path


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_plans")
    return {"tiny": _write_plan(folder, "tiny.toml"), "i2v": _write_plan(folder, "tiny_i2v.toml"), "folder": folder}


@pytest.fixture(scope="module")
def pipe(plans):
    return telefuser.load_plan(str(plans["tiny"]))


class Gate:
    """A runner around the real pipeline that holds each job at its first step until released."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, values, on_step):
        def hook(done, total):
            if done == 1:
                self.entered.set()
                assert self.release.wait(60)
            on_step(done, total)
        return self.pipe.run(**values, progress=False, on_step=hook)


@contextlib.contextmanager
def service(pipe, tmp_path, runner=None, **settings):
    from fastapi.testclient import TestClient

    from telefuser.serve.server import Settings, build

    settings.setdefault("output_dir", tmp_path / "out")
    app, manager = build(pipe, Settings(**settings), runner=runner)
    manager.start()
    try:
        with TestClient(app) as client:
            yield client, manager
    finally:
        if isinstance(runner, Gate):
            runner.release.set()
        manager.shutdown(timeout=60)


@contextlib.contextmanager
def live_server(pipe, tmp_path, **settings):
    """A real uvicorn on 127.0.0.1 and a free port, in a thread."""
    import uvicorn

    from telefuser.serve.server import Settings, build

    settings.setdefault("output_dir", tmp_path / "out")
    app, manager = build(pipe, Settings(**settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    manager.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", manager
    finally:
        server.should_exit = True
        thread.join(10)
        manager.shutdown(timeout=60)
        sock.close()


def wait_for(client, video_id, states=("completed", "failed"), timeout=120, headers=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/videos/{video_id}", headers=headers).json()
        if job["status"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{video_id} still {job['status']} after {timeout} s")


def idle(manager, timeout=60):
    deadline = time.time() + timeout
    while manager.busy() and time.time() < deadline:
        time.sleep(0.02)
    assert not manager.busy()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def decode_mp4(data: bytes, tmp_path: Path, name: str) -> np.ndarray:
    import imageio_ffmpeg

    path = tmp_path / name
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames)


def png_bytes(width=64, height=48, seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (a decompression bomb's shape)."""
    data = bytearray(png_bytes(16, 16))
    ihdr = data[16:29]
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


# -- the runtime hook ---------------------------------------------------------------------------------------------
def test_on_step_reports_every_step_and_an_exception_aborts_the_run(pipe):
    seen = []
    pipe.run(prompt="a cat", seed=1, progress=False, on_step=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    class Stop(Exception):
        pass

    def stop(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        pipe.run(prompt="a cat", seed=1, progress=False, on_step=stop)


# -- the request model and its checks --------------------------------------------------------------------------------
def test_request_model_and_openapi_document_exactly_this_plans_layer3(pipe, tmp_path):
    with service(pipe, tmp_path) as (client, _):
        spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    props = schema["properties"]
    assert set(props) == {"prompt", "negative_prompt", "seed", "resolution", "aspect_ratio", "size", "seconds", "model",
                          "retry_if_replica_dies"}
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    assert props["resolution"]["anyOf"][0]["enum"] == ["144p", "480p"] and props["resolution"]["default"] == "144p"
    assert props["seed"]["anyOf"][0]["minimum"] == 0 and props["seed"]["default"] == 42
    assert props["size"]["anyOf"][0]["enum"] == ["256x144", "192x192", "144x256", "832x480", "624x624", "480x832"]
    assert props["seconds"]["anyOf"][0]["const"] == "1.125"  # 9 frames at 8 fps, fixed by the plan
    assert "input_reference" not in body["multipart/form-data"]["schema"]["properties"]  # text-to-video
    # nothing layer 2 fixed is a field
    assert not {"num_inference_steps", "cfg_scale", "num_frames", "sample_solver"} & set(props)


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "x", "size": "1280x720"}, "size '1280x720' is not offered by this plan; its sizes are 256x144, 192x192"),
    ({"prompt": "x", "seconds": "4"}, "its videos are 1.125 s (9 frames at 8 fps"),
    ({"prompt": "x", "resolution": "720p"}, "resolution '720p' is not allowed by this plan; its choices are 144p, 480p"),
    ({"prompt": "x", "seed": -1}, "seed -1 is outside the plan's range"),
    ({"prompt": "x", "seed": "seven"}, "seed must be an integer, got 'seven'"),
    ({"prompt": "x", "num_inference_steps": 50}, "this plan does not take parameter(s) num_inference_steps"),
    ({"prompt": "  "}, "--prompt is empty"),
    ({"prompt": "a\x00b"}, "--prompt holds a NUL character"),
    ({"prompt": "x", "negative_prompt": "n" * 10_001}, "--negative-prompt is 10,001 characters long"),
    ({}, "the plan requires prompt"),
    ({"prompt": "x" * 10_001}, "at most 10,000 characters"),
    ({"prompt": "x", "model": "sora-2"}, "model 'sora-2' is not served here"),
    ({"prompt": "x", "size": "256x144", "aspect_ratio": "1:1"}, "size 256x144 means aspect_ratio '16:9'"),
])
def test_bad_values_get_422_with_telefuser_runs_message(pipe, tmp_path, body, needle):
    from telefuser.errors import ParameterError
    from telefuser.runtime.io.params import PROMPT_PARAMETERS, check_prompts, resolve_parameters

    with service(pipe, tmp_path) as (client, manager):
        r = client.post("/v1/videos", json=body)
        assert r.status_code == 422, r.text
        assert needle in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert manager.jobs == {} and files_in(tmp_path / "out") == []
    # where the CLI checks the same value, its message is the one the service gives
    plain = {k: v for k, v in body.items() if k in ("resolution", "seed")}
    if plain:
        with pytest.raises(ParameterError) as info:
            resolve_parameters(pipe.plan, prompt="x", **plain)
        assert str(info.value) == r.json()["error"]["message"]
    texts = {k: v for k, v in body.items() if k in PROMPT_PARAMETERS}
    if needle.startswith("--"):  # a prompt check: telefuser-run calls the same rule
        with pytest.raises(ParameterError) as info:
            check_prompts(pipe.plan, texts)
        assert str(info.value) == r.json()["error"]["message"]


def test_multipart_form_fields_are_converted_like_the_cli(pipe, tmp_path):
    with service(pipe, tmp_path) as (client, _):
        r = client.post("/v1/videos", data={"prompt": "a fox", "seed": "9", "size": "144x256", "seconds": "1.125"})
        assert r.status_code == 200, r.text
        job = r.json()
        assert (job["size"], job["seconds"], job["model"], job["status"]) == ("144x256", "1.125", "tiny", "queued")
        assert wait_for(client, job["id"])["status"] == "completed"
        r = client.post("/v1/videos", data={"prompt": "a fox", "seed": "9.5"})
        assert r.status_code == 422 and "seed must be an integer, got '9.5'" in r.json()["error"]["message"]


# -- the official openai client ---------------------------------------------------------------------------------------
def test_openai_client_create_poll_download_list_delete_and_same_frames_as_telefuser_run(pipe, plans, tmp_path):
    openai = pytest.importorskip("openai")
    from telefuser.cli.run import main as run_main

    with live_server(pipe, tmp_path, api_key=KEY) as (url, manager), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        video = client.videos.create_and_poll(prompt="a red fox in the snow", size="256x144", poll_interval_ms=50,
                                              extra_body={"seed": 7, "negative_prompt": "blurry"})
        assert video.status == "completed" and video.progress == 100 and video.model == "tiny"
        assert video.size == "256x144" and video.seconds == "1.125" and video.prompt == "a red fox in the snow"
        assert video.completed_at >= video.created_at and video.error is None
        assert client.videos.retrieve(video.id).status == "completed"
        mp4 = client.videos.download_content(video.id).read()
        other = client.videos.create(prompt="a cat")
        listed = [v.id for v in client.videos.list()]
        assert listed[:2] == [other.id, video.id]  # newest first
        first_page = client.videos.list(order="asc", limit=1)
        assert [v.id for v in first_page.data] == [video.id] and first_page.has_more
        assert [v.id for v in first_page] == [video.id, other.id]  # the client follows the pages (after=last_id)
        deleted = client.videos.delete(video.id)
        assert deleted.deleted and deleted.id == video.id
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(video.id)
        with pytest.raises(openai.UnprocessableEntityError, match="not offered by this plan"):
            client.videos.create(prompt="x", size="1280x720")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-0000", max_retries=0).videos.list()
        idle(manager)
    out = tmp_path / "cli.mp4"
    assert run_main([str(plans["tiny"]), "--prompt", "a red fox in the snow", "--seed", "7", "--negative-prompt",
                     "blurry", "-o", str(out), "--no-progress"]) == 0
    served = decode_mp4(mp4, tmp_path, "served.mp4")
    assert served.shape == (9, 144, 256, 3)
    assert np.array_equal(served, decode_mp4(out.read_bytes(), tmp_path, "cli_copy.mp4"))
    # and the frames the pipeline makes directly (the encoder is lossy, so compare its output for both)
    assert served.std() > 1.0


# -- the queue -----------------------------------------------------------------------------------------------------
def test_jobs_run_in_order_cancel_queued_and_running_leaves_no_file(pipe, tmp_path):
    gate = Gate(pipe)
    out = tmp_path / "out"
    with service(pipe, tmp_path, runner=gate) as (client, manager):
        a = client.post("/v1/videos", json={"prompt": "first"}).json()
        b = client.post("/v1/videos", json={"prompt": "second"}).json()
        c = client.post("/v1/videos", json={"prompt": "third"}).json()
        assert gate.entered.wait(60)
        assert client.get(f"/v1/videos/{a['id']}").json()["status"] == "in_progress"
        assert client.get(f"/v1/videos/{b['id']}").json()["status"] == "queued"
        # cancel the queued one
        assert client.delete(f"/v1/videos/{b['id']}").json() == {"id": b["id"], "object": "video.deleted",
                                                                  "deleted": True}
        assert client.get(f"/v1/videos/{b['id']}").status_code == 404
        # cancel the running one: it stops at its next step boundary
        assert client.delete(f"/v1/videos/{a['id']}").status_code == 200
        gate.entered.clear()
        gate.release.set()
        done = wait_for(client, c["id"])
        assert done["status"] == "completed"
        idle(manager)
        assert files_in(out) == [manager.get(c["id"]).path.name]  # only c's mp4: no partial, none for a or b
        assert client.get(f"/v1/videos/{a['id']}").status_code == 404
        metrics = client.get("/metrics").text
        assert 'telefuser_jobs_finished_total{outcome="cancelled"} 2' in metrics
        assert 'telefuser_jobs_finished_total{outcome="completed"} 1' in metrics
        assert client.delete("/v1/videos/video_nope").status_code == 404
        assert client.get(f"/v1/videos/{c['id']}/content?variant=thumbnail").status_code == 422


def test_full_queue_gets_429_with_retry_after(pipe, tmp_path):
    gate = Gate(pipe)
    with service(pipe, tmp_path, runner=gate, max_queue=1) as (client, manager):
        first = client.post("/v1/videos", json={"prompt": "one"}).json()
        assert gate.entered.wait(60)  # running: the queue is empty again
        assert client.post("/v1/videos", json={"prompt": "two"}).status_code == 200
        r = client.post("/v1/videos", json={"prompt": "three"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        assert "telefuser_queue_depth 1" in client.get("/metrics").text
        assert 'telefuser_requests_rejected_total{reason="queue_full"} 1' in client.get("/metrics").text
        gate.release.set()
        assert wait_for(client, first["id"])["status"] == "completed"
        idle(manager)


def test_a_failing_job_fails_alone(pipe, tmp_path):
    from telefuser.runtime.pipeline import OutOfMemory

    def runner(values, on_step):
        if values["prompt"] == "boom":
            raise OutOfMemory("out of memory during stage 'denoise': test; lower the resolution")
        if values["prompt"] == "bug":
            raise ValueError("a bug")
        return pipe.run(**values, progress=False, on_step=on_step)

    with service(pipe, tmp_path, runner=runner) as (client, manager):
        ids = [client.post("/v1/videos", json={"prompt": p}).json()["id"] for p in ("boom", "bug", "fine")]
        jobs = [wait_for(client, i) for i in ids]
        assert [j["status"] for j in jobs] == ["failed", "failed", "completed"]
        assert jobs[0]["error"] == {"code": "out_of_memory",
                                    "message": "out of memory during stage 'denoise': test; lower the resolution"}
        assert jobs[1]["error"]["code"] == "internal_error"
        assert client.get(f"/v1/videos/{ids[0]}/content").status_code == 404
        assert client.get("/healthz").json()["status"] == "ok"


def test_finished_jobs_and_files_are_removed_after_keep_seconds(pipe, tmp_path):
    with service(pipe, tmp_path, keep_seconds=0.3) as (client, manager):
        job = client.post("/v1/videos", json={"prompt": "short-lived"}).json()
        done = wait_for(client, job["id"])
        assert done["expires_at"] is not None
        path = manager.get(job["id"]).path
        deadline = time.time() + 10
        while client.get(f"/v1/videos/{job['id']}").status_code != 404 and time.time() < deadline:
            time.sleep(0.05)
        assert client.get(f"/v1/videos/{job['id']}").status_code == 404 and not path.exists()


# -- security ------------------------------------------------------------------------------------------------------
def test_api_key_on_every_endpoint_but_healthz_the_page_and_the_schema(pipe, tmp_path):
    with service(pipe, tmp_path, api_key=KEY) as (client, _):
        auth = {"Authorization": f"Bearer {KEY}"}
        for method, path in (("get", "/v1/videos"), ("post", "/v1/videos"), ("get", "/v1/videos/x"),
                             ("get", "/v1/videos/x/content"), ("delete", "/v1/videos/x"), ("get", "/metrics"),
                             ("get", "/docs/other"), ("get", "/openapi.json/x")):
            r = getattr(client, method)(path)
            assert r.status_code == 401, (method, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
            r = getattr(client, method)(path, headers={"Authorization": "Bearer wrong-key-000"})
            assert r.status_code == 401
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/videos", headers=auth).status_code == 200
        assert client.get("/metrics", headers=auth).status_code == 200
        # Swagger UI loads in a browser (which sends no header to open it), and its "Authorize" sends the key
        docs = client.get("/docs")
        assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text
        assert client.get("/docs/oauth2-redirect").status_code == 200
        spec = client.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["bearer"] == {
            "type": "http", "scheme": "bearer",
            "description": "The key the service was started with (--api-key / TELEFUSER_API_KEY)."}
        assert spec["security"] == [{"bearer": []}] and spec["paths"]["/healthz"]["get"]["security"] == []
        assert "VideoCreate" in json.dumps(spec["paths"]["/v1/videos"]["post"])  # the plan's request model
        assert client.get("/openapi.json").json() == spec  # built once
    with service(pipe, tmp_path, api_key=None) as (client, _):  # no key: no scheme to authorize with
        assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


def test_open_address_refused_without_key(plans, capsys):
    from telefuser.cli.serve import main
    from telefuser.serve.server import ServeError, Settings, check_settings

    with pytest.raises(ServeError, match="--api-key"):
        check_settings(Settings(host="0.0.0.0"))
    check_settings(Settings(host="::1", output_dir=plans["folder"] / "o"))
    env = os.environ.pop("TELEFUSER_API_KEY", None)
    try:
        assert main([str(plans["tiny"]), "--host", "0.0.0.0"]) == 2  # refused before the plan loads
    finally:
        if env is not None:
            os.environ["TELEFUSER_API_KEY"] = env
    assert "TELEFUSER_API_KEY" in capsys.readouterr().err


def test_job_ids_are_random_and_never_paths(pipe, tmp_path):
    with service(pipe, tmp_path) as (client, manager):
        ids = {client.post("/v1/videos", json={"prompt": f"p{i}"}).json()["id"] for i in range(3)}
        assert len(ids) == 3 and all(i.startswith("video_") and len(i) == 38 for i in ids)
        for i in ids:
            wait_for(client, i)
        assert not any(i[len("video_"):] in name for i in ids for name in files_in(tmp_path / "out"))
        for evil in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd"):
            assert client.get(f"/v1/videos/{evil}/content").status_code == 404


def test_bodies_and_images_bounded_413(pipe, tmp_path):
    from telefuser.serve.app import Limits

    limits = Limits(max_body_bytes=200_000, max_image_bytes=50_000)
    with service(pipe, tmp_path, limits=limits) as (client, manager):
        r = client.post("/v1/videos", content=b"{" + b" " * 300_000 + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        big = png_bytes(200, 200)  # ~120 kB of noise: under the body limit, over the image limit
        assert 50_000 < len(big) < 200_000
        r = client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", big, "image/png")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"

        def chunks():  # no Content-Length: counted as it streams in
            for _ in range(30):
                yield b" " * 10_000

        r = client.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert manager.jobs == {} and files_in(tmp_path / "out") == []


def test_image_refused_by_text_to_video_plan(pipe, tmp_path):
    with service(pipe, tmp_path) as (client, manager):
        r = client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", png_bytes(), "image/png")})
        assert r.status_code == 422 and "text-to-video" in r.json()["error"]["message"]
        assert manager.jobs == {}


# -- image-to-video ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def i2v_pipe(plans):
    return telefuser.load_plan(str(plans["i2v"]))


def test_image_to_video_via_multipart_openai_client_and_bad_images(i2v_pipe, tmp_path):
    openai = pytest.importorskip("openai")
    image = png_bytes(80, 60, seed=3)
    with live_server(i2v_pipe, tmp_path) as (url, manager), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        spec = httpx.get(url + "/openapi.json").json()
        form = spec["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert "input_reference" in form["required"] and form["properties"]["input_reference"]["format"] == "binary"
        video = client.videos.create_and_poll(prompt="the cat turns", input_reference=("cat.png", image, "image/png"),
                                              extra_body={"seed": 3}, poll_interval_ms=50)
        assert video.status == "completed", video.error
        served = decode_mp4(client.videos.download_content(video.id).read(), tmp_path, "i2v.mp4")
        with pytest.raises(openai.UnprocessableEntityError, match="needs the video's first frame"):
            client.videos.create(prompt="no image")
        before = files_in(tmp_path / "out")
        for bad, needle in ((b"not an image at all", "is not an image"), (image[: len(image) // 2], "damaged"),
                            (png_claiming(10_000, 9_000), "megapixels")):
            r = httpx.post(url + "/v1/videos", data={"prompt": "x"}, files={"input_reference": ("x.png", bad)})
            assert r.status_code == 422 and needle in r.json()["error"]["message"], r.text
        assert files_in(tmp_path / "out") == before and len(manager.jobs) == 1
    # the same frames as the Python API with the same image and seed (through the same encoder)
    direct = tmp_path / "direct.mp4"
    from PIL import Image

    i2v_pipe.run(prompt="the cat turns", image=Image.open(io.BytesIO(image)), seed=3, progress=False).save(direct)
    assert np.array_equal(served, decode_mp4(direct.read_bytes(), tmp_path, "direct_copy.mp4"))


# -- health, metrics, page ----------------------------------------------------------------------------------------
def test_healthz_and_metrics(pipe, tmp_path):
    with service(pipe, tmp_path) as (client, manager):
        assert client.get("/healthz").json() == {"status": "ok", "model": "tiny", "queue_depth": 0}
        wait_for(client, client.post("/v1/videos", json={"prompt": "m"}).json()["id"])
        text = client.get("/metrics").text
        for needle in ("telefuser_queue_depth 0", 'telefuser_jobs{state="completed"} 1',
                       "telefuser_step_seconds_count 4", 'telefuser_step_seconds_bucket{le="+Inf"} 4',
                       "telefuser_peak_memory_bytes{kind=", "# TYPE telefuser_step_seconds histogram"):
            assert needle in text
        manager.stop_accepting()
        assert client.get("/healthz").status_code == 503
        assert client.post("/v1/videos", json={"prompt": "late"}).status_code == 503


def test_page_is_generated_from_layer3(pipe, tmp_path):
    with service(pipe, tmp_path, api_key=KEY) as (client, _):
        page = client.get("/")  # open: it holds no data and sends the key the user types
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for name in ("prompt", "negative_prompt", "seed", "resolution", "aspect_ratio"):
        assert f'id="field-{name}"' in html and f'data-param="{name}"' in html
    assert '<option value="480p">480p</option>' in html and '<option value="144p" selected>' in html
    assert 'min="0"' in html and 'id="api-key"' in html and '<progress id="progress"' in html
    assert 'fetch("/v1/videos"' in html and "/content" in html and "createObjectURL" in html
    assert "num_inference_steps" not in html


def _chrome():
    import shutil

    for browser in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(browser) and shutil.which("chromedriver"):
            return shutil.which(browser)
    return None


def test_page_in_a_headless_browser(pipe, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser = _chrome()
    if browser is None:
        pytest.skip("no chromium + chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    with live_server(pipe, tmp_path, api_key=KEY) as (url, manager):
        driver = webdriver.Chrome(options=options)
        try:
            driver.get(url + "/")
            driver.find_element(By.ID, "api-key").send_keys(KEY)
            driver.find_element(By.ID, "field-prompt").send_keys("a fox in a browser")
            driver.find_element(By.ID, "field-seed").send_keys("5")
            Select(driver.find_element(By.ID, "field-aspect_ratio")).select_by_value("1:1")
            driver.find_element(By.ID, "submit").click()
            WebDriverWait(driver, 120).until(
                lambda d: d.find_element(By.ID, "status").text in ("completed", "failed")
                or d.find_element(By.ID, "status").text.startswith("refused"))
            assert driver.find_element(By.ID, "status").text == "completed", \
                driver.find_element(By.ID, "message").text
            assert driver.find_element(By.ID, "progress").get_attribute("value") == "100"
            video = driver.find_element(By.ID, "video")
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                "return arguments[0].readyState >= 1 && !arguments[0].hidden", video))
            assert driver.execute_script("return [arguments[0].videoWidth, arguments[0].videoHeight]", video) == \
                [192, 192]
            job = manager.get(driver.find_element(By.ID, "job-id").text)
            assert job.request.params.seed == 5 and job.request.prompt == "a fox in a browser"
        finally:
            driver.quit()


# -- a real process and SIGTERM ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("drain, signals", [(False, 1), (True, 1), (True, 2)],
                         ids=["cancel", "drain", "drain-then-second-signal-cancels"])
def test_sigterm_cancels_or_drains_the_running_job_exit_143_no_partial_file(plans, tmp_path, drain, signals):
    plan = _write_plan(tmp_path, "tiny.toml", ["layer2.num_inference_steps=24"])  # a job long enough to catch
    port, out = _free_port(), tmp_path / "videos"
    cmd = [sys.executable, "-m", "telefuser.cli.serve", str(plan), "--port", str(port), "--output-dir", str(out),
           "--log-level", "warning", *(["--drain"] if drain else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        job = httpx.post(url + "/v1/videos", json={"prompt": "a long one"}).json()
        queued = httpx.post(url + "/v1/videos", json={"prompt": "waiting"}).json()
        while True:
            state = httpx.get(f"{url}/v1/videos/{job['id']}").json()
            if state["status"] == "in_progress" and state["progress"] >= 5:
                break
            assert state["status"] in ("queued", "in_progress"), state
            time.sleep(0.02)
        assert state["progress"] < 80
        proc.send_signal(signal.SIGTERM)
        if signals == 2:
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert code == 143, stderr
    names = files_in(out)
    assert not [n for n in names if "partial" in n or n.startswith(".")], names
    finished = drain and signals == 1
    assert len([n for n in names if n.endswith(".mp4")]) == (1 if finished else 0), (names, stderr)
    assert queued["status"] == "queued"


def test_plans_of_several_dp_replicas_are_refused(plans):
    from telefuser.serve.server import ServeError, check_plan

    plan = compile_recipe(RECIPES / "tiny.toml", ["target.num_devices=2", "layer2.parallel_config.dp_degree=2"])
    with pytest.raises(ServeError, match="dp_degree 2"):
        check_plan(plan)
    check_plan(compile_recipe(RECIPES / "tiny.toml", ["target.num_devices=2", "layer2.parallel_config.cfg_degree=2"]))


def test_page_of_an_image_to_video_plan_has_the_file_field(i2v_pipe, tmp_path):
    with service(i2v_pipe, tmp_path) as (client, _):
        html = client.get("/").text
    assert 'type="file"' in html and 'name="input_reference"' in html and 'data-param="image"' in html
    assert 'id="api-key"' not in html  # no key on this service


def test_cli_help_lists_the_options():
    from telefuser.cli.serve import build_parser

    text = build_parser().format_help()
    for option in ("--host", "--port", "--api-key", "--output-dir", "--max-queue", "--keep-seconds", "--drain",
                   "--max-body-mb", "--max-image-mb", "--ray", "--replicas"):
        assert option in text
