"""Where each key of a TOML file is written: key path -> line number.

tomllib returns values without positions, and error messages need the line of
a key. tomlkit keeps positions but would be a second, much larger parser to
trust and to depend on; since tomllib has already accepted the text, a light
scan of its tokens is enough: table headers `[a.b]`, arrays of tables
`[[a.b]]` (each entry gets its index: `layer1.models.1.path`), dotted and
quoted keys, inline tables and arrays (their entries get their index too), and
strings, so that a `=` or `#` inside a string is never taken for a key.
"""

from __future__ import annotations

import re
from typing import Iterator, NamedTuple

_TOKEN = re.compile(
    r"""(?P<nl>\n)|(?P<ws>[ \t\r]+)|(?P<comment>\#[^\n]*)
    |(?P<str>\"\"\"(?:\\.|[^\\])*?\"\"\"\"{0,2}|'''.*?''''{0,2}|"(?:\\.|[^"\\\n])*"|'[^'\n]*')
    |(?P<punct>[\[\]{}=,.])|(?P<atom>[^\s\[\]{}=,.\#"']+)""",
    re.VERBOSE | re.DOTALL,
)


class _Tok(NamedTuple):
    kind: str
    text: str
    line: int
    start: int
    end: int


def _tokens(text: str) -> Iterator[_Tok]:
    line = 1
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup or "atom"
        if kind not in ("ws", "comment"):
            yield _Tok(kind, m.group(), line, m.start(), m.end())
        line += m.group().count("\n")


def _key_part(tok: _Tok) -> str:
    if tok.kind == "str" and tok.text[0] == '"':
        return tok.text[1:-1].encode("utf-8").decode("unicode_escape") if "\\" in tok.text else tok.text[1:-1]
    return tok.text[1:-1] if tok.kind == "str" else tok.text


class _Scanner:
    def __init__(self, text: str) -> None:
        self.toks = list(_tokens(text))
        self.i = 0
        self.lines: dict[tuple[str, ...], int] = {}
        self.table_counts: dict[tuple[str, ...], int] = {}

    def peek(self, skip_newlines: bool = False) -> _Tok | None:
        while skip_newlines and self.i < len(self.toks) and self.toks[self.i].kind == "nl":
            self.i += 1
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def record(self, path: tuple[str, ...], line: int) -> None:
        self.lines.setdefault(path, line)

    def key(self) -> tuple[list[str], int]:
        """A dotted key up to (not including) '=' or ']'."""
        first = self.take()
        parts = [_key_part(first)]
        while (tok := self.peek()) is not None and tok.text == ".":
            self.take()
            parts.append(_key_part(self.take()))
        return parts, first.line

    def value(self, path: tuple[str, ...]) -> None:
        tok = self.take()
        if tok.text == "[":
            index = 0
            while (nxt := self.peek(skip_newlines=True)) is not None and nxt.text != "]":
                if nxt.text == ",":
                    self.take()
                    continue
                self.record((*path, str(index)), nxt.line)
                self.value((*path, str(index)))
                index += 1
            self.take()
        elif tok.text == "{":
            while (nxt := self.peek()) is not None and nxt.text != "}":
                if nxt.text == ",":
                    self.take()
                    continue
                self.assignment(path)
            self.take()
        else:  # a scalar: the rest of it (a float's '.', a date's time) is skipped by the caller
            while (nxt := self.peek()) is not None and nxt.kind == "atom" or (nxt and nxt.text == "."):
                self.take()

    def assignment(self, table: tuple[str, ...]) -> None:
        parts, line = self.key()
        path = (*table, *parts)
        for end in range(len(table) + 1, len(path) + 1):
            self.record(path[:end], line)
        self.take()  # '='
        self.value(path)

    def header(self) -> tuple[str, ...]:
        opening = self.take()
        is_array = self.peek() is not None and self.peek().text == "[" and self.peek().start == opening.end
        if is_array:
            self.take()
        parts, line = self.key()
        resolved: tuple[str, ...] = ()
        for n, part in enumerate(parts):
            resolved = (*resolved, part)
            if is_array and n == len(parts) - 1:
                count = self.table_counts.get(resolved, 0)
                self.table_counts[resolved] = count + 1
                self.record(resolved, line)
                resolved = (*resolved, str(count))
            elif resolved in self.table_counts:  # inside the latest entry of an array of tables
                resolved = (*resolved, str(self.table_counts[resolved] - 1))
            self.record(resolved, line)
        self.take()
        if is_array:
            self.take()
        return resolved

    def scan(self) -> dict[tuple[str, ...], int]:
        table: tuple[str, ...] = ()
        while (tok := self.peek(skip_newlines=True)) is not None:
            if tok.text == "[":
                table = self.header()
            else:
                self.assignment(table)
            while (rest := self.peek()) is not None and rest.kind != "nl":  # tolerate anything odd to line end
                self.take()
        return self.lines


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line of every key path written in `text` (a TOML document tomllib accepted)."""
    return _Scanner(text).scan()


def line_of(lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    """The line of `path`, or of its nearest written ancestor (e.g. the table holding a missing key)."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None
