"""`--set a.b.c=value` overrides, typed by the recipe schema.

The value is converted by the schema type at that key path: integers, numbers
and booleans parsed, strings and enum values taken verbatim, arrays and tables
written as TOML literals (`--set layer2.tile_size=[32,32]`). A list of tables
whose entries have a `name` is addressed by that name:
`--set layer1.models.dit.path=/models/dit.safetensors`.
"""

from __future__ import annotations

import tomllib
from typing import Any

from telefuser.errors import RecipeError

from .recipe_schema import allowed_keys, at_path, child, resolve, suggest_key


def _suggest(word: str, options: list[str]) -> str:
    close = suggest_key(word, options)
    return f"; did you mean {close!r}?" if close else (f"; allowed: {', '.join(options)}" if options else "")


def _convert(text: str, schema: dict[str, Any], where: str) -> Any:
    kinds = {schema.get("type")} | {o.get("type") for o in schema.get("anyOf", [])}
    try:
        if "boolean" in kinds and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if "integer" in kinds:
            return int(text)
        if "number" in kinds:
            return float(text)
        if kinds & {"array", "object"}:
            return tomllib.loads(f"v = {text}")["v"]
        if kinds == {None} and "enum" not in schema:  # untyped: a TOML literal if it is one, else a string
            try:
                return tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                return text
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        expected = "/".join(sorted(k for k in kinds if k))
        raise RecipeError(f"--set {where}={text}: expected a {expected} value, found {text!r} ({exc}).") from exc
    return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r} is not of the form key.path=value (e.g. layer2.num_inference_steps=4).")
    dotted, text = assignment.split("=", 1)
    keys = [k.strip() for k in dotted.strip().split(".")]
    if not all(keys):
        raise RecipeError(f"--set {assignment!r}: the key path {dotted!r} has an empty part.")
    schema_path: list[str] = []
    container: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        node = at_path(schema_path)
        if isinstance(container, list):
            names = [e.get("name") for e in container if isinstance(e, dict)]
            if key not in names:
                raise RecipeError(f"--set {dotted}: no entry named {key!r} in {'.'.join(keys[:depth])}{_suggest(key, names)}")
            container = container[names.index(key)]
            schema_path.append("0")
            continue
        sub = child(node, key) if node is not None else None
        if sub is None:
            raise RecipeError(f"--set {dotted}: {'.'.join(keys[:depth + 1])} is not a recipe key"
                              f"{_suggest(key, allowed_keys(node) if node else [])}")
        schema_path.append(key)
        if last:
            container[key] = _convert(text.strip(), resolve(sub), dotted)
        else:
            container = container.setdefault(key, [] if sub.get("type") == "array" else {})
