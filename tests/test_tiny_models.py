"""The committed tiny model set is what the generator writes: same files, keys, shapes, dtypes and values."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from telefuser.models.tiny import DERIVED, FILES, TOKENIZER_FILE, generate

COMMITTED = Path(__file__).resolve().parents[1] / "recipes" / "tiny"


def test_regenerating_gives_the_committed_files(tmp_path):
    written = generate(tmp_path)
    assert set(written) == {*FILES, *DERIVED, "tokenizer"}
    for role, filename in {**FILES, **DERIVED}.items():
        fresh, committed = load_file(str(tmp_path / filename)), load_file(str(COMMITTED / filename))
        assert {k: (v.shape, v.dtype) for k, v in fresh.items()} == {k: (v.shape, v.dtype) for k, v in committed.items()}, role
        for key, value in fresh.items():
            assert torch.equal(value, committed[key]), f"{role}: {key}"
    assert (tmp_path / TOKENIZER_FILE).read_text() == (COMMITTED / TOKENIZER_FILE).read_text()


def test_tiny_set_stays_small():
    total = sum(p.stat().st_size for p in COMMITTED.iterdir())
    assert total < 4 * 2**20, f"recipes/tiny holds {total / 2**20:.1f} MiB"
