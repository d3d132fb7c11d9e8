"""Canonical JSON and the plan hash: one byte sequence per plan content.

Keys sorted, no NaN/inf, floats in Python's shortest round-trip form (so a
float reads back to the same value and prints the same way again).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

UNHASHED_FIELDS = ("plan_hash", "timestamp")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plan_hash(raw: dict[str, Any]) -> str:
    """sha256 of the plan's canonical JSON without `plan_hash` and `timestamp`."""
    return sha256_text(canonical_json({k: v for k, v in raw.items() if k not in UNHASHED_FIELDS}))


def pretty_json(obj: Any) -> str:
    """The plan file's text: canonical ordering, indented for people and diffs."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
