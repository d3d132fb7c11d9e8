"""Walking the generated recipe JSON Schema: the sub-schema at a key path, and its allowed keys."""

from __future__ import annotations

import difflib
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


# Names earlier recipes used, and the reference design's name that replaced each. Refused like any
# unknown key (one name per concept); only the hint uses this table, since "mode" is not close to
# "offload_type" by spelling.
RENAMED_KEYS = {
    "impl": "attn_impl", "sparse": "sparse_config", "attention": "attention_config",
    "mode": "offload_type", "pin_memory": "pin_cpu_memory", "ratio": "offload_ratio", "prefetch": "prefetch_size",
    "offload": "offload_config", "compile": "compile_config", "quantization": "quant_config", "type": "quant_type",
    "lora": "lora_configs", "feature_cache": "feature_cache_config", "parallel": "parallel_config",
    "dp": "dp_degree", "cfg": "cfg_degree", "sp_ulysses": "sp_ulysses_degree", "sp_ring": "sp_ring_degree",
    "pp": "pp_degree", "tp": "tp_degree",
}


def suggest_key(key: str, allowed: list[str]) -> str | None:
    """The allowed key `key` most likely meant: its new name if it was renamed, else the closest spelling."""
    renamed = RENAMED_KEYS.get(key)
    if renamed in allowed:
        return renamed
    close = difflib.get_close_matches(key, allowed, n=1)
    return close[0] if close else None
