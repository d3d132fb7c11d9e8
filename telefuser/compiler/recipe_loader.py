"""Reading a recipe: TOML -> extends -> ${VAR} -> --set -> JSON Schema -> pydantic.

Every failure is a RecipeError whose message names the file, the line, the key
path, what was expected and what was found.

A Recipe built in Python takes the same road from its `to_data()` (what a TOML
file of it holds): ${VAR} -> --set -> JSON Schema -> pydantic. It stands for the
file `<base_dir>/<name>.toml` (base_dir: where its relative paths resolve; the
current directory by default), which is the path the plan records, and its
source hash is computed as a file's is, from the validated recipe: so a Recipe
and an equal TOML file at that path compile to the same plan hash.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pydantic

from telefuser.errors import RecipeError
from telefuser.schema.canonical import canonical_json, sha256_text
from telefuser.schema.recipe import Recipe

from .recipe_lines import key_lines, line_of
from .recipe_overrides import apply_override
from .recipe_schema import allowed_keys, at_path, recipe_schema, suggest_key

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    data: dict[str, Any]
    source_sha256: str


@dataclass(frozen=True)
class _Source:
    path: Path
    lines: dict[tuple[str, ...], int]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file; check the path.")
    if path.is_dir():
        raise RecipeError(f"{path} is a directory; give a recipe .toml file (use --check to validate a folder).")
    if not path.is_file():
        raise RecipeError(f"{path} is not a regular file (a device or pipe?); give a recipe .toml file.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot be read ({exc.strerror}); check its permissions.") from exc
    if not raw.strip():
        raise RecipeError(f"{path} is empty; a recipe needs at least `name` and a [layer1] with its models.")
    if b"\x00" in raw:
        raise RecipeError(f"{path} is a binary file, not TOML text; give the recipe's .toml file.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); TOML files must be "
            "UTF-8: re-save it with that encoding."
        ) from exc


def _parse(path: Path) -> tuple[dict[str, Any], _Source]:
    text = _read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: TOML syntax error: {exc}. Fix the syntax there (a truncated file also ends here).") from exc
    return data, _Source(path, key_lines(text))


def _merge(base: Any, child: Any) -> Any:
    """Child wins; tables merge recursively; lists of named tables merge by name; other lists are replaced."""
    if isinstance(base, dict) and isinstance(child, dict):
        out = dict(base)
        for key, value in child.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(child, list) and all(isinstance(e, dict) and "name" in e for e in base + child):
        merged = {e["name"]: e for e in base}
        for entry in child:
            merged[entry["name"]] = _merge(merged.get(entry["name"], {}), entry)
        return list(merged.values())
    return child


def _load_chain(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[_Source]]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p.name) for p in (*chain, path))
        raise RecipeError(f"{chain[-1]}: `extends` forms a cycle ({cycle}); remove one of these `extends` lines.")
    data, source = _parse(path)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data, [source]
    if not isinstance(base_name, str):
        raise RecipeError(f"{path}, line {line_of(source.lines, ('extends',))}: `extends` must be a file name string, found {base_name!r}.")
    base_path = path.parent / base_name
    if not base_path.is_file():
        raise RecipeError(
            f"{path}, line {line_of(source.lines, ('extends',))}: `extends = {base_name!r}` names {base_path}, "
            "which does not exist; the path is relative to this recipe's folder."
        )
    base, sources = _load_chain(base_path, (*chain, path))
    return _merge(base, data), [source, *sources]


def _interpolate(value: Any, path: tuple[str, ...], where: "_Locator") -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, (*path, k), where) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*path, str(i)), where) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise RecipeError(
            f"{where(path)}: {'.'.join(path)} uses ${{{name}}}, but the environment variable {name} is not set; "
            f"export it, or write ${{{name}:-default}} to give a default."
        )

    return _VAR.sub(substitute, value)


class _Locator:
    """Formats 'file, line N' for a key path, looking through the extends chain."""

    def __init__(self, sources: list[_Source]) -> None:
        self.sources = sources

    def __call__(self, path: Sequence[str]) -> str:
        key = tuple(str(p) for p in path)
        for source in self.sources:
            if key and key in source.lines:
                return f"{source.path}, line {source.lines[key]}"
        for source in self.sources:
            line = line_of(source.lines, key)
            if line is not None:
                return f"{source.path}, line {line}"
        return str(self.sources[0].path)


def _describe_found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_error_message(error: jsonschema.ValidationError, where: _Locator) -> str:
    path = [str(p) for p in error.absolute_path]
    dotted = ".".join(path) or "(top level)"
    if error.validator == "additionalProperties":
        node = at_path(path)
        allowed = allowed_keys(node) if node else []
        unknown = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        parts = []
        for key in unknown:
            close = suggest_key(key, allowed)
            parts.append(f"{key!r}" + (f" (did you mean {close!r}?)" if close else ""))
        key_path = [*path, unknown[0]] if unknown else path
        return (f"{where(key_path)}: unknown key {', '.join(parts)} in {dotted}; "
                f"allowed keys there: {', '.join(allowed)}.")
    if error.validator == "enum":
        options = [str(o) for o in error.validator_value]
        close = difflib.get_close_matches(str(error.instance), options, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"{where(path)}: {dotted} must be one of {', '.join(options)}; found {_describe_found(error.instance)}.{hint}"
    if error.validator == "required":
        return f"{where(path)}: {dotted} is missing a required key: {error.message}."
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        words = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
        return (f"{where(path)}: {dotted} must be {words[error.validator]} {error.validator_value}; "
                f"found {_describe_found(error.instance)}.")
    if error.validator == "pattern":
        return (f"{where(path)}: {dotted} must match the pattern {error.validator_value}; "
                f"found {_describe_found(error.instance)}.")
    if error.validator == "type":
        return (f"{where(path)}: {dotted} must be of type {error.validator_value}; found "
                f"{_describe_found(error.instance)} ({type(error.instance).__name__}).")
    return f"{where(path)}: {dotted}: {error.message}."


def _validate_schema(data: dict[str, Any], where: _Locator) -> None:
    validator = jsonschema.Draft202012Validator(recipe_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        # anyOf failures wrap the useful error in their context; report the most specific one.
        first = errors[0]
        while first.context:
            first = min(first.context, key=lambda e: -len(e.absolute_path))
        more = f" ({len(errors) - 1} more problem(s) after fixing this one.)" if len(errors) > 1 else ""
        raise RecipeError(_schema_error_message(first, where) + more)


def _validate_model(data: dict[str, Any], where: _Locator) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        path = [str(p) for p in first["loc"]]
        message = first["msg"].removeprefix("Value error, ")
        found = "" if first["type"] == "value_error" else f"; found {_describe_found(first.get('input'))}"
        dotted = ".".join(path) or "recipe"
        more = f" ({exc.error_count() - 1} more problem(s).)" if exc.error_count() > 1 else ""
        raise RecipeError(f"{where(path)}: {dotted}: {message}{found}.{more}") from exc


def source_sha256(recipe: Recipe) -> str:
    """The recipe's identity: sha256 of the canonical JSON of the validated recipe, every default filled in.
    Comments, formatting, `extends` layout and defaults written out or left implicit do not change it."""
    return sha256_text(canonical_json(recipe.model_dump(mode="json", by_alias=True)))


def _in_memory(recipe: Recipe, base_dir: str | Path | None) -> tuple[dict[str, Any], Path, _Locator]:
    if recipe.extends is not None:
        raise RecipeError(
            f"recipe {recipe.name!r} (built in Python) has extends = {recipe.extends!r}; a Recipe object is already "
            "complete: load the base with load_recipe(path).recipe and change it with model_copy(update=...), "
            "or write the variant as a TOML file."
        )
    base = Path.cwd() if base_dir is None else Path(base_dir)
    if not base.is_dir():
        raise RecipeError(f"base_dir {str(base)!r} for recipe {recipe.name!r} is not a folder; "
                          "the recipe's relative paths resolve against it.")
    path = base.resolve() / f"{recipe.name}.toml"
    return recipe.to_data(), path, _Locator([_Source(Path(f"recipe {recipe.name!r} (built in Python)"), {})])


def load_recipe(source: str | Path | Recipe, overrides: Sequence[str] = (),
                base_dir: str | Path | None = None) -> LoadedRecipe:
    """Read, merge, interpolate, override and validate a recipe file, or a Recipe built in Python (its
    relative paths resolve against `base_dir`, default the current directory)."""
    if isinstance(source, Recipe):
        data, path, where = _in_memory(source, base_dir)
    else:
        if base_dir is not None:
            raise TypeError("base_dir applies to a Recipe object; "
                            "a recipe file's relative paths resolve against its folder")
        path = Path(source).resolve()
        data, sources = _load_chain(path)
        where = _Locator(sources)
    data = _interpolate(data, (), where)
    for assignment in overrides:
        apply_override(data, assignment)
    _validate_schema(data, where)
    recipe = _validate_model(data, where)
    return LoadedRecipe(recipe=recipe, path=path, data=data, source_sha256=source_sha256(recipe))
