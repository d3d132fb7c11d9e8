"""TOML text of a recipe's data (`Recipe.to_toml`).

A tiny emitter rather than a dependency (tomli-w): a recipe holds only strings, numbers, booleans, lists, tables
and the one array of tables layer1.models (and lora_configs), all from `Recipe.to_data()`.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # ints as digits; floats in their shortest round-trip form (no nan/inf in a recipe)
    if isinstance(value, str):  # JSON's escapes are TOML basic-string escapes; TOML also wants DEL escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_table(table: dict[str, Any], path: tuple[str, ...], lines: list[str], array: bool = False) -> None:
    """One table: its plain keys, then its sub-tables under headers. Top-level sections and tables that
    hold tables get a [header]; other tables below them are written inline, as recipes are by hand."""

    def nested(v: Any) -> bool:
        return _is_table_array(v) or (isinstance(v, dict) and (not path or any(
            isinstance(x, dict) or _is_table_array(x) for x in v.values())))

    plain = [(k, v) for k, v in table.items() if not nested(v)]
    if path and (array or plain or not table):
        header = ".".join(_toml_key(k) for k in path)
        lines += ["", f"[[{header}]]" if array else f"[{header}]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain]
    for key, value in table.items():
        if _is_table_array(value):
            for entry in value:
                _toml_table(entry, (*path, key), lines, array=True)
        elif nested(value):
            _toml_table(value, (*path, key), lines)


def to_toml(data: dict[str, Any]) -> str:
    """TOML text of a recipe's `to_data()`."""
    lines: list[str] = []
    _toml_table(data, (), lines)
    return "\n".join(lines) + "\n"
