"""Walking the generated recipe JSON Schema: the sub-schema at a key path, and its allowed keys."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema" / "recipe.schema.json"


@lru_cache(maxsize=1)
def recipe_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow $ref and drop the `null` branch of Optional fields."""
    root = recipe_schema()
    while True:
        if "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
            continue
        options = [o for o in node.get("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1:
            node = options[0]
            continue
        return node


def child(node: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The schema of `key` inside an object or array schema, or None if the key is not allowed."""
    node = resolve(node)
    if node.get("type") == "array" or "items" in node:
        return resolve(node.get("items", {})) if key.isdigit() else None
    props = node.get("properties", {})
    if key in props:
        return resolve(props[key])
    extra = node.get("additionalProperties")
    if extra is True:
        return {}  # free-form table (e.g. a model's arch): any key, any value
    return resolve(extra) if isinstance(extra, dict) else None


def at_path(path: list[str]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = resolve(recipe_schema())
    for key in path:
        if node is None:
            return None
        node = child(node, key)
    return node


def allowed_keys(node: dict[str, Any]) -> list[str]:
    return sorted(resolve(node).get("properties", {}))
