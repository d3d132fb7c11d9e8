"""telefuser-run end to end on the tiny plan: a valid mp4, --help from the plan, and exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imageio_ffmpeg
import pytest

from telefuser.compiler import compile_recipe
from telefuser.schema.canonical import pretty_json
from telefuser.cli.run import main as run_main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def compile_to(recipe: Path, plan: Path) -> Path:
    plan.write_text(pretty_json(compile_recipe(recipe).model_dump(mode="json", by_alias=True)))
    return plan


def compile_tiny(folder: Path, edit=lambda text: text) -> Path:
    """Copy the tiny recipe (edited) and its weights into `folder` and compile them there."""
    (folder / "tiny.toml").write_text(edit((RECIPES / "tiny.toml").read_text()))
    shutil.copytree(RECIPES / "tiny", folder / "tiny")
    return compile_to(folder / "tiny.toml", folder / "tiny.plan.json")


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    return compile_tiny(tmp_path_factory.mktemp("tiny"))


def _error(capsys) -> str:
    """stderr as one line (the CLI wraps its paragraph), checked to hold no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_run_writes_a_valid_mp4(plan, tmp_path, capsys):
    out = tmp_path / "fox.mp4"
    code = run_main([str(plan), "--prompt", "a red fox in snow", "--seed", "3", "--aspect-ratio", "1:1",
                     "-o", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    for stage in ("load", "encode", "denoise", "decode", "write", "peak mem"):
        assert stage in printed
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert meta["size"] == (192, 192) and meta["fps"] == 8
    assert sum(1 for _ in reader) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.mp4"]


def test_help_lists_the_plans_parameters(plan, capsys):
    with pytest.raises(SystemExit) as info:
        run_main([str(plan), "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--prompt", "--negative-prompt", "--seed", "--resolution", "{144p,480p}",
                   "--aspect-ratio", "{16:9,9:16,1:1}", "default: 42", "default: '144p'"):
        assert needle in text


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--seed", "seven"], "invalid int value"),
        (["--resolution", "720p"], "invalid choice"),
        (["--seed", "-1"], "outside the plan's range"),
    ],
)
def test_bad_values_exit_2(plan, tmp_path, capsys, extra, needle):
    out = tmp_path / "v.mp4"
    try:
        code = run_main([str(plan), "--prompt", "x", "-o", str(out), *extra])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert needle in _error(capsys)
    assert not out.exists()


def test_unwritable_output_exits_2(plan, capsys):
    assert run_main([str(plan), "--prompt", "x", "-o", "/sys/v.mp4"]) == 2
    assert "not writable" in _error(capsys)


def test_missing_plan_exits_2(tmp_path, capsys):
    assert run_main([str(tmp_path / "nope.json"), "--prompt", "x", "-o", str(tmp_path / "v.mp4")]) == 2
    assert "does not exist" in _error(capsys)


def _edit_plan(plan: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(plan.read_text())
    edit(data)
    edited = tmp_path / "edited.plan.json"
    edited.write_text(json.dumps(data))
    return edited


def test_edited_plan_fails_its_hash(plan, tmp_path, capsys):
    def more_steps(data):
        data["layer2_inference_config"]["num_inference_steps"] = 5

    edited = _edit_plan(plan, tmp_path, more_steps)
    assert run_main([str(edited), "--prompt", "x", "-o", str(tmp_path / "v.mp4")]) == 2
    assert "changed after it was compiled" in _error(capsys)
    assert not (tmp_path / "v.mp4").exists()


def test_cuda_plan_on_this_cpu_machine_exits_2(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    plan = compile_tiny(tmp_path, lambda text: text.replace('device = "cpu"', 'device = "cuda"\ngpu = "H100"'))
    assert run_main([str(plan), "--prompt", "x", "-o", str(tmp_path / "v.mp4")]) == 2
    assert "no usable CUDA GPU" in _error(capsys)


def test_missing_and_changed_weights_exit_2(tmp_path, capsys):
    plan = compile_tiny(tmp_path)
    vae = tmp_path / "tiny" / "vae.safetensors"
    original = vae.read_bytes()
    # Same size, different header: a fingerprint change.
    header_len = int.from_bytes(original[:8], "little")
    header = original[8:8 + header_len].replace(b'"telefuser":"tiny"', b'"telefuser":"tinx"')
    assert header != original[8:8 + header_len]
    vae.write_bytes(original[:8] + header + original[8 + header_len:])
    assert run_main([str(plan), "--prompt", "x", "-o", str(tmp_path / "v.mp4")]) == 2
    assert "changed since the plan was compiled" in _error(capsys)
    vae.unlink()
    assert run_main([str(plan), "--prompt", "x", "-o", str(tmp_path / "v.mp4")]) == 2
    assert "missing" in _error(capsys)
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.slow  # three fresh interpreters importing torch: ~6-8 s on a 2-core CPU
def test_readme_main_job_through_the_installed_entry_points(tmp_path):
    """`telefuser-compile recipes/tiny.toml -o plan` then `telefuser-run plan --prompt ... -o out.mp4`."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    plan, out = tmp_path / "tiny.plan.json", tmp_path / "tiny.mp4"
    subprocess.run([bin_dir / "telefuser-compile", RECIPES / "tiny.toml", "-o", plan], check=True, capture_output=True)
    done = subprocess.run([bin_dir / "telefuser-run", plan, "--prompt", "a red fox running through fresh snow",
                           "-o", out], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "denoising" in done.stderr  # the tqdm bar
    assert f"wrote {out}" in done.stdout and "peak mem" in done.stdout
    meta = next(imageio_ffmpeg.read_frames(str(out)))
    assert meta["size"] == (256, 144)
    # A bad value from a real process: exit 2, one paragraph, no traceback, no file.
    bad = subprocess.run([bin_dir / "telefuser-run", plan, "--prompt", "x", "--resolution", "720p",
                          "-o", tmp_path / "bad.mp4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not (tmp_path / "bad.mp4").exists()


def test_help_without_a_plan_says_to_give_one(capsys):
    assert run_main(["--help"]) == 0
    assert "telefuser-run PLAN --help" in capsys.readouterr().out
    assert run_main(["--prompt", "x"]) == 2
    assert "no plan given" in _error(capsys)


def test_out_of_memory_exits_2_without_a_file(plan, tmp_path, capsys, monkeypatch):
    import torch

    from telefuser.models.wan.vae import WanVAE

    def exhausted(self, *args, **kwargs):  # what the CUDA caching allocator raises
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(WanVAE, "decode", exhausted)
    out = tmp_path / "v.mp4"
    assert run_main([str(plan), "--prompt", "x", "-o", str(out), "--no-progress"]) == 2
    err = _error(capsys)
    assert "out of memory during stage 'decode_vae'" in err and "MODEL_CPU_OFFLOAD" in err
    assert list(tmp_path.iterdir()) == []
