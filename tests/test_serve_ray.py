"""telefuser-serve on Ray: a local Ray instance, 2 replicas of the tiny plan behind the same API; 8 concurrent
requests all served correctly by both replicas; a replica killed mid-job fails that job alone and is replaced."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")

from telefuser.compiler import compile_recipe  # noqa: E402
from telefuser.schema.canonical import pretty_json  # noqa: E402

from test_serve import decode_mp4, files_in, idle, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def ray_service(tmp_path_factory):
    from fastapi.testclient import TestClient

    from telefuser.serve.ray_replicas import ray_runners
    from telefuser.serve.server import Settings, build

    folder = tmp_path_factory.mktemp("serve_ray")
    plan = compile_recipe(ROOT / "recipes" / "tiny.toml")
    path = folder / "tiny.plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        runners = ray_runners(path, 2, plan=plan)
        app, manager = build(plan, Settings(output_dir=folder / "out", max_queue=16), runner=runners)
        manager.start()
        with TestClient(app) as client:
            yield client, manager, runners, path, folder
        manager.shutdown(timeout=60)
    finally:
        ray.shutdown()


def test_two_replicas_serve_eight_concurrent_requests(ray_service, tmp_path):
    import telefuser

    client, manager, runners, plan_path, folder = ray_service
    ids: list[str] = [None] * 8  # type: ignore[list-item]

    def submit(i):
        r = client.post("/v1/videos", json={"prompt": f"video {i}", "seed": i})
        assert r.status_code == 200, r.text
        ids[i] = r.json()["id"]

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = [wait_for(client, i, timeout=300) for i in ids]
    assert [j["status"] for j in jobs] == ["completed"] * 8, [j["error"] for j in jobs]
    assert {manager.get(i).replica for i in ids} == {0, 1}  # both replicas worked
    assert "telefuser_step_seconds_count 32" in client.get("/metrics").text
    videos = [decode_mp4(client.get(f"/v1/videos/{i}/content").content, tmp_path, f"{n}.mp4")
              for n, i in enumerate(ids)]
    assert all(v.shape == (9, 144, 256, 3) for v in videos)
    # each is the video this plan makes for its seed (checked for one against this process's own pipeline)
    direct = tmp_path / "direct.mp4"
    telefuser.load_plan(str(plan_path)).run(prompt="video 5", seed=5, progress=False).save(direct)
    assert np.array_equal(videos[5], decode_mp4(direct.read_bytes(), tmp_path, "direct_copy.mp4"))
    assert not np.array_equal(videos[5], videos[4])


def test_a_killed_replica_fails_its_job_alone_and_is_replaced(ray_service):
    client, manager, runners, _, folder = ray_service
    idle(manager)
    before = files_in(folder / "out")
    victim = client.post("/v1/videos", json={"prompt": "doomed"}).json()["id"]
    deadline = time.time() + 60
    while manager.get(victim).status == "queued" and time.time() < deadline:
        time.sleep(0.01)
    replica = manager.get(victim).replica
    generation = runners[replica].generation
    ray.kill(runners[replica].actor, no_restart=True)
    failed = wait_for(client, victim, timeout=120)
    assert failed["status"] == "failed" and failed["error"]["code"] == "replica_died", failed
    assert f"replica {replica} died" in failed["error"]["message"]
    # the others keep serving, and the dead one is replaced
    after = [client.post("/v1/videos", json={"prompt": f"after {i}"}).json()["id"] for i in range(3)]
    assert [wait_for(client, i, timeout=300)["status"] for i in after] == ["completed"] * 3
    deadline = time.time() + 120
    while runners[replica].generation == generation and time.time() < deadline:
        time.sleep(0.1)
    assert runners[replica].generation == generation + 1
    assert ray.get(runners[replica].actor.ready.remote(), timeout=60).startswith("pid")
    new = set(files_in(folder / "out")) - set(before)
    assert len(new) == 3 and all(n.endswith(".mp4") and not n.startswith(".") for n in new)


def test_a_job_that_allows_it_is_retried_once_when_its_replica_dies(ray_service):
    client, manager, runners, _, folder = ray_service
    idle(manager)
    job_id = client.post("/v1/videos", json={"prompt": "survivor", "retry_if_replica_dies": True}).json()["id"]
    deadline = time.time() + 60
    while manager.get(job_id).status == "queued" and time.time() < deadline:
        time.sleep(0.01)
    first = manager.get(job_id).replica
    ray.kill(runners[first].actor, no_restart=True)
    done = wait_for(client, job_id, timeout=300)
    assert done["status"] == "completed" and manager.get(job_id).attempts == 1, done


def test_a_replica_of_two_ranks(ray_service, tmp_path):
    """A 2-rank plan (cfg parallel, gloo) as one Ray replica: two actors in one placement group; the video is the
    one-rank video; killing its second rank fails the job as replica_died and the replica comes back with both."""
    from fastapi.testclient import TestClient

    from telefuser.serve.ray_replicas import ray_runners
    from telefuser.serve.server import Settings, build

    client1, _, _, _, folder = ray_service
    overrides = ["target.num_devices=2", "layer2.parallel_config.cfg_degree=2"]
    plan = compile_recipe(ROOT / "recipes" / "tiny.toml", overrides)
    path = tmp_path / "cfg2.plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    runners = ray_runners(path, 1, plan=plan)
    assert len(runners[0].actors) == 2
    app, manager = build(plan, Settings(output_dir=tmp_path / "out"), runner=runners)
    manager.start()
    try:
        with TestClient(app) as client:
            job = client.post("/v1/videos", json={"prompt": "video 5", "seed": 5}).json()["id"]
            assert wait_for(client, job, timeout=300)["status"] == "completed"
            served = decode_mp4(client.get(f"/v1/videos/{job}/content").content, tmp_path, "two.mp4")
            one_rank = client1.post("/v1/videos", json={"prompt": "video 5", "seed": 5}).json()["id"]
            assert wait_for(client1, one_rank, timeout=300)["status"] == "completed"
            reference = decode_mp4(client1.get(f"/v1/videos/{one_rank}/content").content, tmp_path, "one.mp4")
            assert np.abs(served.astype(int) - reference.astype(int)).max() <= 2
            victim = client.post("/v1/videos", json={"prompt": "doomed"}).json()["id"]
            while manager.get(victim).status == "queued":
                time.sleep(0.01)
            ray.kill(runners[0].actors[1], no_restart=True)
            failed = wait_for(client, victim, timeout=300)
            assert failed["status"] == "failed" and failed["error"]["code"] == "replica_died", failed
            again = client.post("/v1/videos", json={"prompt": "again"}).json()["id"]
            assert wait_for(client, again, timeout=300)["status"] == "completed"
            assert runners[0].generation == 2
    finally:
        manager.shutdown(timeout=60)
        for actor in runners[0].actors:
            ray.kill(actor)
