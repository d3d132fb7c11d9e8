"""The tiny pipeline on several CPU ranks (gloo), started the way users start it, against one rank.

Each layout runs through `telefuser.distributed.launch` (what `telefuser-run` does for a plan of N
ranks); every rank calls the Python API (`telefuser.load_plan(p).run(...)`), and rank 0 saves the
frames. Tolerance: the frames are uint8 after 4 float32 denoising steps and the VAE; reordered float32
sums (ring's log-sum-exp merge) move latents by ~1e-6, which can flip a rounding at a .5 boundary, so
a pixel may differ by 1 level, in well under 0.1% of the values; a wrong shard, a dropped branch or a
misrouted prediction changes most pixels by far more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.distributed.launch import run_local_ranks
from telefuser.schema.canonical import pretty_json

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"
PROMPT, SEED = "a red fox running through fresh snow", 3
DRIVER = (
    "import os, sys, numpy as np, telefuser\n"
    "video = telefuser.load_plan(sys.argv[1]).run(prompt=sys.argv[2], seed=int(sys.argv[3]), progress=False)\n"
    "assert (video is None) == (os.environ['RANK'] != '0'), 'the video comes back on rank 0 only'\n"
    "if video is not None:\n"
    "    np.save(sys.argv[4], video.frames)\n"
)
LAYOUTS = {
    "cfg2": (2, ["cfg_degree=2"]),
    "ulysses2": (2, ["sp_ulysses_degree=2"]),
    "ring2": (2, ["sp_ring_degree=2"]),
    "ring2_ulysses2": (4, ["sp_ring_degree=2", "sp_ulysses_degree=2"]),
    "cfg2_ulysses2": (4, ["cfg_degree=2", "sp_ulysses_degree=2"]),
    "tp2": (2, ["tp_degree=2"]),
    "cfg2_tp2": (4, ["cfg_degree=2", "tp_degree=2"]),
    "cfg2_fsdp": (2, ["cfg_degree=2", "enable_fsdp=true"]),
    "ring2_ulysses2_fsdp": (4, ["sp_ring_degree=2", "sp_ulysses_degree=2", "enable_fsdp=true"]),
}


def compile_tiny(folder: Path, world: int, degrees: list[str], extra: tuple[str, ...] = ()) -> Path:
    overrides = [f"target.num_devices={world}", *(f"layer2.parallel_config.{d}" for d in degrees), *extra]
    plan = folder / f"plan_{world}_{'_'.join(degrees) or 'single'}.json"
    plan.write_text(pretty_json(compile_recipe(RECIPE, overrides).model_dump(mode="json", by_alias=True)))
    return plan


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    pipe = telefuser.load_plan(str(compile_tiny(Path(os.environ.get("TMPDIR", "/tmp")), 1, [])))
    return pipe.run(prompt=PROMPT, seed=SEED, progress=False).frames


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_gives_the_one_rank_video(layout, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world, degrees = LAYOUTS[layout]
    plan = compile_tiny(tmp_path, world, degrees)
    out = tmp_path / "frames.npy"
    code = run_local_ranks([sys.executable, "-c", DRIVER, str(plan), PROMPT, str(SEED), str(out)], world)
    assert code == 0
    frames = np.load(out)
    assert frames.shape == reference.shape
    diff = np.abs(frames.astype(int) - reference.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"{layout}: max {diff.max()}, differing {(diff > 0).mean()}"


I2V_RECIPE = RECIPE.parent / "tiny_i2v.toml"
I2V_DRIVER = DRIVER.replace("progress=False)", "image=sys.argv[5], progress=False)")
I2V_LAYOUTS = {"ulysses2": (2, ["sp_ulysses_degree=2"]), "cfg2": (2, ["cfg_degree=2"])}


@pytest.fixture(scope="module")
def i2v_image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("i2v") / "first.png"
    rng = np.random.default_rng(7)
    Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize((400, 300)).save(path)
    return path


@pytest.fixture(scope="module")
def i2v_reference(i2v_image) -> np.ndarray:
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    plan = folder / "plan_i2v_single.json"
    plan.write_text(pretty_json(compile_recipe(I2V_RECIPE).model_dump(mode="json", by_alias=True)))
    return telefuser.load_plan(str(plan)).run(prompt=PROMPT, seed=SEED, image=str(i2v_image), progress=False).frames


@pytest.mark.parametrize("layout", list(I2V_LAYOUTS))
def test_i2v_layout_gives_the_one_rank_video(layout, i2v_reference, i2v_image, tmp_path, monkeypatch):
    """Image-to-video: the image is read, CLIP-encoded and VAE-encoded on rank 0 and its y and CLIP tokens broadcast;
    Ulysses shards the tokens after the DiT concatenated y to the noise; under cfg parallel rank 1 runs the
    unconditional branch with the same y and CLIP tokens."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world, degrees = I2V_LAYOUTS[layout]
    overrides = [f"target.num_devices={world}", *(f"layer2.parallel_config.{d}" for d in degrees)]
    plan = tmp_path / "plan.json"
    plan.write_text(pretty_json(compile_recipe(I2V_RECIPE, overrides).model_dump(mode="json", by_alias=True)))
    out = tmp_path / "frames.npy"
    code = run_local_ranks([sys.executable, "-c", I2V_DRIVER, str(plan), PROMPT, str(SEED), str(out), str(i2v_image)],
                           world)
    assert code == 0
    diff = np.abs(np.load(out).astype(int) - i2v_reference.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"{layout}: max {diff.max()}, differing {(diff > 0).mean()}"


def test_a_bad_image_is_refused_before_the_ranks_start(tmp_path):
    overrides = ["target.num_devices=2", "layer2.parallel_config.sp_ulysses_degree=2"]
    plan = tmp_path / "plan.json"
    plan.write_text(pretty_json(compile_recipe(I2V_RECIPE, overrides).model_dump(mode="json", by_alias=True)))
    (tmp_path / "notes.png").write_text("not an image")
    run = _telefuser_run(str(plan), "--image", str(tmp_path / "notes.png"), "--prompt", PROMPT, "-o",
                         str(tmp_path / "x.mp4"))
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2 and stderr.count("is not an image") == 1 and "rank" not in stderr, stderr
    assert not list(tmp_path.glob("*.mp4*"))


def _telefuser_run(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "telefuser.cli.run", *args], text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_telefuser_run_starts_the_ranks_and_rank_0_writes(tmp_path):
    plan = compile_tiny(tmp_path, 2, ["sp_ulysses_degree=2"])
    out = tmp_path / "fox.mp4"
    run = _telefuser_run(str(plan), "--prompt", PROMPT, "-o", str(out))
    stdout, stderr = run.communicate(timeout=180)
    assert run.returncode == 0, stderr
    assert out.stat().st_size > 0 and stdout.count("wrote ") == 1 and stdout.count("denoise ") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".json") == ["fox.mp4"]


def test_wrong_world_size_under_torchrun_is_refused(tmp_path):
    plan = compile_tiny(tmp_path, 2, ["cfg_degree=2"])
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    run = _telefuser_run(str(plan), "--prompt", PROMPT, "-o", str(tmp_path / "x.mp4"), env=env)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2 and "started with 3 processes but the plan has 2 ranks" in " ".join(stderr.split())
    assert "Traceback" not in stderr and not (tmp_path / "x.mp4").exists()


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launched rank `rank` among the launcher's children (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_rank_ends_the_run_with_one_message_and_no_video(tmp_path):
    plan = compile_tiny(tmp_path, 2, ["sp_ring_degree=2"], ("layer2.num_inference_steps=200",))
    out = tmp_path / "never.mp4"
    run = _telefuser_run(str(plan), "--prompt", PROMPT, "-o", str(out))
    deadline = time.monotonic() + 120
    pid = None
    while pid is None and time.monotonic() < deadline and run.poll() is None:
        pid = _rank_pid(run.pid, 1)
        time.sleep(0.2)
    assert pid is not None, "rank 1 never started"
    time.sleep(3)  # into loading or denoising
    os.kill(pid, signal.SIGKILL)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGKILL, stderr
    assert "rank 1 of 2" in stderr and "SIGKILL" in stderr
    assert not out.exists() and not list(tmp_path.glob("*.mp4*")) and not list(tmp_path.glob(".never*"))
    assert _rank_pid(run.pid, 0) is None


@pytest.mark.parametrize("degrees,needles", [
    (["sp_ulysses_degree=4"], ["sp_ulysses_degree = 4 does not divide the 2 attention heads", "choose one of [1, 2]"]),
    (["tp_degree=4"], ["tp_degree = 4 does not divide the 2 attention heads"]),
    (["pp_degree=2", "cfg_degree=2"], ["pp_degree = 2: pipeline parallelism is not built yet"]),
])
def test_compiler_refuses_degrees_the_model_cannot_take(tmp_path, capsys, degrees, needles):
    from telefuser.cli.compile import main

    world = 4
    args = [str(RECIPE), "-o", str(tmp_path / "p.json"), "--set", f"target.num_devices={world}"]
    for d in degrees:
        args += ["--set", f"layer2.parallel_config.{d}"]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert all(n in err for n in needles), err
    assert not (tmp_path / "p.json").exists()


BATCH_DRIVER = (
    "import sys, numpy as np, telefuser\n"
    "pipe = telefuser.load_plan(sys.argv[1])\n"
    "for index, video in pipe.run_many(sys.argv[3].split('|'), seed=int(sys.argv[4]), progress=False):\n"
    "    np.save(f'{sys.argv[2]}/{index}.npy', video.frames)\n"
)
BATCH = ["a red fox in snow", "a lighthouse at night", "two cats"]


def test_dp_splits_a_batch_and_each_video_is_the_one_rank_video(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single = telefuser.load_plan(str(compile_tiny(tmp_path, 1, [])))
    plan = compile_tiny(tmp_path, 2, ["dp_degree=2"])
    code = run_local_ranks([sys.executable, "-c", BATCH_DRIVER, str(plan), str(tmp_path), "|".join(BATCH), "5"], 2)
    assert code == 0
    for index, prompt in enumerate(BATCH):  # prompts 0 and 2 on replica 0, prompt 1 on replica 1
        expected = single.run(prompt=prompt, seed=5, progress=False).frames
        assert np.array_equal(np.load(tmp_path / f"{index}.npy"), expected), prompt


def test_prompts_file_writes_one_video_per_line(tmp_path, capsys):
    from telefuser.cli.run import main

    plan = compile_tiny(tmp_path, 1, [])
    (tmp_path / "prompts.txt").write_text("# holiday clips\na red fox\n\n  a lighthouse at night  \n")
    assert main([str(plan), "--prompts", str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000-a-red-fox.mp4", "0001-a-lighthouse-at-night.mp4"]
    assert "2 videos in" in capsys.readouterr().out


@pytest.mark.parametrize("content,output,needle", [
    (None, "out", "no such file"),
    ("# only a comment\n\n", "out", "holds no prompt"),
    (b"\xff\xfe bad", "out", "is not UTF-8"),
    ("a fox\n", "x.mp4", "with --prompts, -o names a folder"),
])
def test_bad_prompts_file_or_output_is_refused(tmp_path, capsys, content, output, needle):
    from telefuser.cli.run import main

    plan = compile_tiny(tmp_path, 1, [])
    prompts = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        prompts.write_bytes(content)
    elif content is not None:
        prompts.write_text(content)
    assert main([str(plan), "--prompts", str(prompts), "-o", str(tmp_path / output)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert needle in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.mp4"))


def test_prompt_and_prompts_together_are_refused(tmp_path, capsys):
    from telefuser.cli.run import main

    plan = compile_tiny(tmp_path, 1, [])
    with pytest.raises(SystemExit) as exit_info:
        main([str(plan), "--prompt", "x", "--prompts", "p.txt", "-o", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "not both" in capsys.readouterr().err


def test_vae_parallel_gives_the_one_rank_tiled_video(tmp_path, monkeypatch):
    """The VAE's tiles shared over 2 ranks (with Ulysses 2 for the DiT) equal one rank's tiled decode."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tiles = ("layer2.tile_size=[8, 8]",)
    single = telefuser.load_plan(str(compile_tiny(tmp_path, 1, [], (*tiles, "layer2.tiled=true"))))
    expected = single.run(prompt=PROMPT, seed=SEED, progress=False).frames
    plan = compile_tiny(tmp_path, 2, ["sp_ulysses_degree=2"], (*tiles, "layer2.enable_vae_parallel=true"))
    out = tmp_path / "frames.npy"
    assert run_local_ranks([sys.executable, "-c", DRIVER, str(plan), PROMPT, str(SEED), str(out)], 2) == 0
    diff = np.abs(np.load(out).astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"max {diff.max()}, differing {(diff > 0).mean()}"


def test_memory_estimate_reflects_tp_and_fsdp(tmp_path):
    def weights(degrees: list[str], world: int) -> dict[str, int]:
        overrides = [f"target.num_devices={world}", *(f"layer2.parallel_config.{d}" for d in degrees)]
        plan = compile_recipe(RECIPE, overrides)
        return {k: v for k, v in plan.memory.breakdown.items() if k.startswith("weights.")}

    one = weights([], 1)
    tp = weights(["tp_degree=2"], 2)
    fsdp = weights(["cfg_degree=2", "enable_fsdp=true"], 2)
    assert tp["weights.dit"] == one["weights.dit"] // 2 and tp["weights.text_encoder"] == one["weights.text_encoder"]
    assert fsdp["weights.dit"] == one["weights.dit"] // 2 and fsdp["weights.text_encoder"] == one["weights.text_encoder"] // 2
    assert fsdp["weights.vae"] == one["weights.vae"]


def test_torchrun_runs_telefuser_run_as_its_ranks(tmp_path):
    """`torchrun --nproc-per-node 2 $(which telefuser-run) plan ...`: the ranks join instead of spawning."""
    bin_dir = Path(sys.executable).parent
    plan = compile_tiny(tmp_path, 2, ["cfg_degree=2"])
    out = tmp_path / "fox.mp4"
    done = subprocess.run([bin_dir / "torchrun", "--standalone", "--nproc-per-node", "2", bin_dir / "telefuser-run",
                           str(plan), "--prompt", PROMPT, "-o", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0 and done.stdout.count("wrote ") == 1


TWO_GPUS = ["cfg_degree=2"], ["sp_ulysses_degree=2"], ["sp_ring_degree=2"], ["tp_degree=2"], ["cfg_degree=2", "enable_fsdp=true"]


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("degrees", TWO_GPUS, ids=["_".join(d) for d in TWO_GPUS])
def test_layouts_on_two_gpus_over_nccl(degrees, tmp_path):
    """The tiny plan on 2 GPUs (NCCL) through the launcher, against the same plan on one GPU.

    Tolerance: float32 again, but cuDNN runs the convolutions (patch embedding, the whole VAE) in TF32 by
    default, which turns the 1e-6 reorderings of parallel attention and all-reduces into ~1e-3 before the
    uint8 rounding: on 2 x H200 (2026-11-23) a few percent of values moved by one level, none by more."""
    cuda = ("target.device=auto",)  # this machine: its GPUs
    single = telefuser.load_plan(str(compile_tiny(tmp_path, 1, [], cuda)))
    expected = single.run(prompt=PROMPT, seed=SEED, progress=False).frames
    plan = compile_tiny(tmp_path, 2, degrees, cuda)
    out = tmp_path / "frames.npy"
    assert run_local_ranks([sys.executable, "-c", DRIVER, str(plan), PROMPT, str(SEED), str(out)], 2) == 0
    diff = np.abs(np.load(out).astype(int) - expected.astype(int))
    print(f"{degrees}: max {diff.max()}, differing {(diff > 0).mean():.4f}, mean {diff.mean():.5f}")
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05, f"{degrees}: max {diff.max()}, differing {(diff > 0).mean()}"
