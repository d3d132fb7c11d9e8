"""The tiny HunyuanVideo-1.5 set in tests: a recipe folder that sees its files, and one DiT call's inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from telefuser.models.hunyuan15.tiny import TINY_ARCH

TINY_HY15 = Path(__file__).resolve().parents[1] / "recipes" / "tiny_hy15"


def link_tiny_hy15(folder: Path) -> None:
    """Make recipes written into `folder` find tiny_hy15's files by their relative paths (`tiny_hy15/...`)."""
    if not (folder / "tiny_hy15").exists():
        (folder / "tiny_hy15").symlink_to(TINY_HY15)


def tiny_dit_inputs() -> dict:
    """Keyword inputs of one call of the tiny HY15 DiT (a padded text mask, glyph and vision tokens, I2V channels),
    the same values on every call."""
    g = torch.Generator().manual_seed(3)
    c = TINY_ARCH["dit"]
    text_mask = torch.ones(1, 9, dtype=torch.int64)
    text_mask[0, 7:] = 0
    return {"x": torch.randn(1, c["out_channels"], 2, 4, 4, generator=g), "t": torch.tensor([650.0]),
            "text_states": torch.randn(1, 9, c["text_states_dim"], generator=g), "text_mask": text_mask,
            "byt5_states": torch.randn(1, 5, c["byt5_dim"], generator=g),
            "byt5_mask": torch.ones(1, 5, dtype=torch.int64),
            "vision_states": torch.randn(1, 4, c["vision_states_dim"], generator=g),
            "y": torch.randn(1, c["in_channels"] - c["out_channels"], 2, 4, 4, generator=g)}
