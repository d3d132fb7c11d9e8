"""Where each key of a TOML file is written: key path -> line number.

tomllib returns values without positions, and the well-kept TOML parsers that
keep them (tomlkit) would be a second parser to trust; error messages only
need the line of a key, which a light scan of table headers and `key =`
lines gives. Arrays of tables get their index (`layer1.models.1.path`).
Inline tables and multi-line values map to the line where they start.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-\"'.\s]+?)\s*=")


def _split_key(key: str) -> list[str]:
    return [part.strip().strip("\"'") for part in key.split(".")]


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}
    table: list[str] = []
    array_counts: dict[tuple[str, ...], int] = {}
    in_multiline = False
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            in_multiline = line.count('"""') % 2 == 0 and line.count("'''") % 2 == 0
            continue
        header = _HEADER.match(line)
        if header:
            path = _split_key(header.group(2))
            if header.group(1) == "[[":
                index = array_counts.get(tuple(path), 0)
                array_counts[tuple(path)] = index + 1
                path = [*path, str(index)]
            table = path
            lines.setdefault(tuple(table), number)
            continue
        assign = _ASSIGN.match(line)
        if assign and not line.lstrip().startswith("#"):
            lines.setdefault((*table, *_split_key(assign.group(1))), number)
            rest = line[assign.end():]
            in_multiline = rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1
    return lines


def line_of(lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    """The line of `path`, or of its nearest written ancestor (e.g. an inline table)."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None
