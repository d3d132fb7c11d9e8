"""Weight reading (safetensors, shards, safe pickles) and the atomic mp4 writer (LoRA: tests/test_lora.py)."""

from __future__ import annotations

import json

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from telefuser.errors import WeightsError
from telefuser.errors import OutputPathError
from telefuser.runtime.io.video import Timings, Video, check_output_path
from telefuser.runtime.load.weights import read_state_dict


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(4, generator=g),
            "steps": torch.arange(3)}


def test_safetensors_cast_to_the_compute_dtype_but_integers_kept(tmp_path):
    save_file(_tensors(), str(tmp_path / "w.safetensors"))
    state = read_state_dict([tmp_path / "w.safetensors"], "cpu", torch.bfloat16)
    assert state["a.weight"].dtype == torch.bfloat16 and state["steps"].dtype == torch.int64
    torch.testing.assert_close(state["a.weight"].float(), _tensors()["a.weight"], atol=1e-2, rtol=1e-2)


def test_sharded_index_reads_every_shard(tmp_path):
    t = _tensors()
    save_file({"a.weight": t["a.weight"]}, str(tmp_path / "m-00001.safetensors"))
    save_file({"b.bias": t["b.bias"], "steps": t["steps"]}, str(tmp_path / "m-00002.safetensors"))
    index = {"weight_map": {"a.weight": "m-00001.safetensors", "b.bias": "m-00002.safetensors",
                            "steps": "m-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    state = read_state_dict([tmp_path / "m.safetensors.index.json"])
    assert set(state) == set(t) and torch.equal(state["b.bias"], t["b.bias"])


def test_pth_loads_weights_only_and_refuses_objects(tmp_path):
    torch.save(_tensors(), tmp_path / "ok.pth")
    assert torch.equal(read_state_dict([tmp_path / "ok.pth"])["a.weight"], _tensors()["a.weight"])
    torch.save({"a": torch.zeros(1), "evil": Timings()}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="safely"):
        read_state_dict([tmp_path / "bad.pth"])


def test_missing_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="missing"):
        read_state_dict([tmp_path / "nope.safetensors"])


def _frames(n=5, h=32, w=48):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_mp4_written_atomically_and_readable(tmp_path):
    out = tmp_path / "v.mp4"
    Video(_frames(), fps=8).save(out)
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert meta["size"] == (48, 32) and meta["fps"] == 8
    assert sum(1 for _ in reader) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary file left


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken)
    with pytest.raises(OutputPathError, match="disk full"):
        Video(_frames(), fps=8).save(tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["v.gif", "missing/v.mp4", "."])
def test_bad_output_paths_refused(tmp_path, name):
    with pytest.raises(OutputPathError):
        check_output_path(tmp_path / name)


def test_unwritable_folder_refused_even_for_root(tmp_path):
    # /sys refuses new files to every user, root included; a read-only chmod would not stop root.
    with pytest.raises(OutputPathError, match="not writable"):
        check_output_path("/sys/v.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_path(tmp_path / "file" / "v.mp4")
