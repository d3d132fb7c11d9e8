"""The committed tiny RIFE and TAEHV files (recipes/tiny_vfi) are what telefuser.models.tiny_vfi writes, in the
published key layouts, and stay small."""

from __future__ import annotations

from pathlib import Path

import torch

from telefuser.compiler.vfi_weights import describe_flownet
from telefuser.compiler.vfi_weights import describe_taehv as describe_file
from telefuser.models.tiny_vfi import FILES, TINY_RIFE, TINY_TAEHV1_5, TINY_TAEW2_1, TINY_TAEW2_2, generate

COMMITTED = Path(__file__).resolve().parents[1] / "recipes" / "tiny_vfi"


def test_regenerating_gives_the_committed_files(tmp_path):
    written = generate(tmp_path)
    assert set(written) == set(FILES)
    for name, filename in FILES.items():
        fresh = torch.load(tmp_path / filename, weights_only=True)
        committed = torch.load(COMMITTED / filename, weights_only=True)
        assert list(fresh) == list(committed), name
        for key, value in fresh.items():
            assert value.dtype == torch.float32 and torch.equal(value, committed[key]), f"{name}: {key}"


def test_committed_files_have_the_tiny_archs_and_stay_small():
    assert describe_flownet(COMMITTED / FILES["rife"]) == TINY_RIFE
    assert all(k.startswith("module.") for k in torch.load(COMMITTED / FILES["rife"], weights_only=True))
    assert describe_file(COMMITTED / FILES["taew2_1"]) == TINY_TAEW2_1
    assert describe_file(COMMITTED / FILES["taew2_2"]) == TINY_TAEW2_2
    assert describe_file(COMMITTED / FILES["taehv1_5"]) == TINY_TAEHV1_5
    total = sum(p.stat().st_size for p in COMMITTED.iterdir())
    assert total < 1 * 2**20, f"recipes/tiny_vfi holds {total / 2**20:.2f} MiB"
