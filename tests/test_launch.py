"""telefuser.distributed.launch with real processes: the ranks are tiny Python scripts (no torch),
so each test takes well under a second or two."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from telefuser.distributed.launch import free_port, run_local_ranks, spawn_local_ranks
from telefuser.distributed.rank import launched_world

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and signals are POSIX")

LAUNCH_PY = Path(__file__).resolve().parents[1] / "telefuser" / "distributed" / "launch.py"
HANG_S = 60  # how long a step may take before the test calls it hung

# One rank: argv is (folder, action of rank 0, action of rank 1, ...). It records its environment
# and pid in rankN.json, waits until every rank has done so (so the tests know every pid), then
# acts: exit with a code, sleep, ignore SIGTERM, exit 4 on SIGTERM, SIGKILL itself, or start a
# grandchild first.
RANK_SCRIPT = r"""
import json, os, signal, subprocess, sys, time
folder, actions = sys.argv[1], sys.argv[2:]
rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
action = actions[rank]
info = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
        "MASTER_ADDR", "MASTER_PORT", "TELEFUSER_LAUNCHED", "EXTRA")}
info["pid"] = os.getpid()
if action == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if action == "term4":
    signal.signal(signal.SIGTERM, lambda *_: os._exit(4))
if action.startswith("spawn"):
    info["grandchild"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid
with open(os.path.join(folder, f".rank{rank}.json"), "w") as f:
    json.dump(info, f)
os.replace(os.path.join(folder, f".rank{rank}.json"), os.path.join(folder, f"rank{rank}.json"))
print(f"stdout of rank {rank}", flush=True)
deadline = time.monotonic() + 60  # a hang detector: ranks of a loaded machine may start seconds apart
while time.monotonic() < deadline and not all(
        os.path.exists(os.path.join(folder, f"rank{r}.json")) for r in range(world_size)):
    time.sleep(0.01)
if action == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
exit_codes = {"ok": 0, "exit2": 2, "exit3": 3, "spawn-exit3": 3}
if action in exit_codes:
    sys.exit(exit_codes[action])
time.sleep(60)
"""

# The launcher in a process of its own, so that a signal can be sent to it. It loads launch.py by
# path: importing the package telefuser.distributed would import torch first, for seconds.
DRIVER_SCRIPT = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("launch", sys.argv[1])
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)
sys.exit(launch.run_local_ranks(json.loads(sys.argv[2]), int(sys.argv[3]), grace_seconds=1.0))
"""


def _rank_command(folder: Path, *actions: str) -> list[str]:
    return [sys.executable, "-c", RANK_SCRIPT, str(folder), *actions]


def _infos(folder: Path, world_size: int) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def _alive(pid: int) -> bool:
    """A zombie counts as gone: it is dead, only not reaped yet (a container's pid 1 may never)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except ProcessLookupError:
        return False
    except FileNotFoundError:  # it went just now, or there is no /proc and os.kill found it
        return not Path("/proc/self").exists()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone(pid: int, timeout: float = 15.0) -> bool:
    """A process SIGKILLed through its group dies asynchronously: allow it a moment."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_all_ranks_succeed_with_their_environment(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    code = run_local_ranks(_rank_command(tmp_path, "ok", "ok", "ok"), 3, env={"EXTRA": "x"})
    assert code == 0
    infos = _infos(tmp_path, 3)
    assert [info["RANK"] for info in infos] == ["0", "1", "2"]
    assert [info["LOCAL_RANK"] for info in infos] == ["0", "1", "2"]
    assert {info["MASTER_PORT"] for info in infos} == {infos[0]["MASTER_PORT"]}
    assert 0 < int(infos[0]["MASTER_PORT"]) < 65536
    for info in infos:
        assert (info["WORLD_SIZE"], info["LOCAL_WORLD_SIZE"]) == ("3", "3")
        assert (info["MASTER_ADDR"], info["TELEFUSER_LAUNCHED"], info["EXTRA"]) == ("127.0.0.1", "1", "x")
    out, err = capfd.readouterr()
    assert out == "stdout of rank 0\n"  # ranks 1 and 2 are silent: rank 0 alone prints the summary
    assert "telefuser-run" not in err
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


def test_failed_rank_stops_the_others(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    code = run_local_ranks(_rank_command(tmp_path, "sleep", "exit3"), 2)
    assert code == 3
    assert time.monotonic() - start < 5
    assert "telefuser-run: error: rank 1 of 2 failed (exit code 3); stopped the other ranks." in capfd.readouterr().err
    assert _gone(_infos(tmp_path, 2)[0]["pid"])


def test_first_failure_is_the_one_named(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Rank 0 exits 4 only when stopped: that later failure must not replace rank 1's.
    assert run_local_ranks(_rank_command(tmp_path, "term4", "exit3"), 2) == 3
    err = capfd.readouterr().err
    assert "rank 1 of 2 failed (exit code 3)" in err
    assert "exit code 4" not in err


def test_rank_killed_by_signal(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert run_local_ranks(_rank_command(tmp_path, "sleep", "sigkill"), 2) == 128 + signal.SIGKILL
    assert "rank 1 of 2 was killed by signal 9 (SIGKILL; out of memory?); stopped the other ranks." \
        in capfd.readouterr().err
    assert _gone(_infos(tmp_path, 2)[0]["pid"])


def test_rank_with_bad_input(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert run_local_ranks(_rank_command(tmp_path, "sleep", "exit2"), 2) == 2
    assert "rank 1 of 2 reported bad input (exit code 2; its message is above)" in capfd.readouterr().err


def test_rank_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    start = time.monotonic()
    assert run_local_ranks(_rank_command(tmp_path, "stubborn", "exit3"), 2, grace_seconds=0.5) == 3
    assert 0.5 <= time.monotonic() - start < 5
    assert _gone(_infos(tmp_path, 2)[0]["pid"])


def test_descendants_of_ranks_are_stopped(tmp_path: Path) -> None:
    # Rank 1 exits leaving a grandchild behind; rank 0 is stopped while its grandchild runs.
    assert run_local_ranks(_rank_command(tmp_path, "spawn-sleep", "spawn-exit3"), 2) == 3
    for info in _infos(tmp_path, 2):
        assert _gone(info["grandchild"])


@pytest.mark.parametrize("signum, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_the_launcher_reaches_every_rank(tmp_path: Path, signum: int, expected: int) -> None:
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER_SCRIPT, str(LAUNCH_PY), json.dumps(_rank_command(ranks, "sleep", "sleep")), "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Hang detectors, not speed checks (the launcher's grace is 1 s): generous, so that a loaded machine that
        # starts or reaps processes slowly cannot fail what the test checks (exit code, message, every rank gone).
        deadline = time.monotonic() + HANG_S
        while not all((ranks / f"rank{rank}.json").exists() for rank in range(2)):
            assert time.monotonic() < deadline and driver.poll() is None, "the ranks did not start"
            time.sleep(0.01)
        driver.send_signal(signum)
        _, err = driver.communicate(timeout=HANG_S)
    finally:
        driver.kill()
    assert driver.returncode == expected
    assert f"telefuser-run: interrupted by {signal.Signals(signum).name}; stopped all 2 ranks." in err
    for info in _infos(ranks, 2):
        assert _gone(info["pid"])


def test_spawn_local_ranks_runs_telefuser_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Every rank finds the plan missing, reports it and exits 2: the launcher returns 2.
    assert spawn_local_ranks([str(tmp_path / "missing.json")], 2) == 2
    err = capfd.readouterr().err
    assert "missing.json" in err and "reported bad input" in err


def test_launched_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world() is None
    monkeypatch.setenv("RANK", "0")
    assert launched_world() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_world() == (0, 2)


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_world_size_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        run_local_ranks(_rank_command(tmp_path, "ok"), 0)
