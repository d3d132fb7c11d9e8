"""Generate the committed JSON Schemas from the pydantic models."""

from __future__ import annotations

import json
from pathlib import Path

from .plan import Plan
from .recipe import Recipe

SCHEMA_DIR = Path(__file__).parent
SCHEMA_FILES = {"recipe.schema.json": Recipe, "plan.schema.json": Plan}


def schema_text(model: type) -> str:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://telefuser.dev/schemas/{model.__name__.lower()}.schema.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    written = []
    for filename, model in SCHEMA_FILES.items():
        path = directory / filename
        path.write_text(schema_text(model), encoding="utf-8")
        written.append(path)
    return written


def _resolve(node: dict, defs: dict) -> tuple[dict, bool]:
    """(the node behind $ref / Optional, whether it may be null)."""
    nullable = False
    while True:
        if "$ref" in node:
            node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
            continue
        options = node.get("anyOf", [])
        if options:
            rest = [o for o in options if o.get("type") != "null"]
            nullable = nullable or len(rest) < len(options)
            if len(rest) == 1:
                node = {**rest[0], **{k: v for k, v in node.items() if k != "anyOf"}}
                continue
        return node, nullable


def _type_text(node: dict, defs: dict) -> str:
    node, _ = _resolve(node, defs)
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if node.get("type") == "array":
        return "list of " + _type_text(node.get("items", {}), defs)
    return node.get("type", "any")


def _rows(node: dict, defs: dict, path: str) -> list[tuple[str, str, str, str]]:
    node, nullable = _resolve(node, defs)
    props = node.get("properties")
    if props:
        return [row for key, child in props.items() for row in _rows(child, defs, f"{path}.{key}" if path else key)]
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):  # a table keyed by name (layer2.models)
        return _rows(extra, defs, f"{path}.<name>")
    items, _ = _resolve(node.get("items", {}), defs)
    if node.get("type") == "array" and "properties" in items:
        return _rows(items, defs, f"{path}.[]")
    default = node.get("default", None if nullable else "")
    shown = "" if default in ("", [], {}) else json.dumps(default)
    return [(path, _type_text(node, defs), shown, node.get("description", ""))]


def recipe_key_table() -> str:
    """Every recipe key with its type, default and meaning: the table of docs/recipes.md."""
    schema = Recipe.model_json_schema(by_alias=True, mode="validation")
    rows = sorted(_rows(schema, schema.get("$defs", {}), ""))
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {kind} | {default} | {meaning} |" for key, kind, default, meaning in rows]
    return "\n".join(lines) + "\n"


def write_key_table(doc: Path) -> None:
    """Replace the key table in `doc` (from its header row to the first line after it that is not a row)."""
    lines = doc.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("| key | type | default | meaning |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    doc.write_text("".join(lines[:start]) + recipe_key_table() + "".join(lines[end:]), encoding="utf-8")
