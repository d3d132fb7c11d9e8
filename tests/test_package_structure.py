"""The package's shape (DESIGN.md, "Packages and their rooms"): no import circle between modules, nothing importing
upward against the dependency direction, no module over MAX_LINES lines.

Read from the source with `ast`, every import counted (module level or inside a function: a lazy import still makes
the dependency). Run alone: `python -m tests.test_package_structure` prints the findings.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "telefuser"
MAX_LINES = 400

# Packages a package must never import (DESIGN.md: cli -> compiler -> schema; cli -> runtime -> models -> ops ->
# kernels; serve -> runtime; runtime -> distributed -> ops; nothing imports cli; the compiler never imports the
# runtime or models; models import only from ops, never kernels or distributed).
FORBIDDEN = {
    "schema": {"compiler", "runtime", "models", "ops", "kernels", "distributed", "cli", "serve", "core"},
    "core": {"compiler", "runtime", "models", "ops", "kernels", "distributed", "cli", "serve"},
    "compiler": {"runtime", "models", "distributed", "cli", "serve"},
    "kernels": {"ops", "models", "runtime", "distributed", "compiler", "cli", "serve", "core"},
    "ops": {"models", "runtime", "distributed", "compiler", "cli", "serve"},
    "models": {"kernels", "distributed", "runtime", "compiler", "cli", "serve"},
    "distributed": {"runtime", "compiler", "cli", "serve"},
    "runtime": {"compiler", "cli", "serve"},
    "serve": {"cli"},
}
# DESIGN.md: the compiler "may import a small registry of model classes' descriptions" (names, key layouts; the
# registry imports a model's module only when asked for its class).
ALLOWED = {("compiler", "telefuser.models.registry")}
# Known circles, each to be removed by the work named beside it (the pair as module names, sorted).
KNOWN_CIRCLES: set[tuple[str, ...]] = set()  # none: a new circle is a design question, not an exception


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports (`from x import y` counts x.y when y is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # telefuser.x.y.Name -> telefuser.x.y
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name and target.startswith("telefuser"):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {name: _imports(path, modules) for name, path in files.items()}
    # importing a.b.c also runs a/__init__ and a/b/__init__: not a dependency of the importer's design, so dropped
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} imports {target}" for source, targets in graph.items() for target in targets
                  if _room(target) in FORBIDDEN.get(_room(source), set()) and (_room(source), target) not in ALLOWED)


def test_no_import_circle_inside_the_package():
    unknown = [c for c in circles(import_graph()) if tuple(c) not in KNOWN_CIRCLES]
    assert unknown == [], f"import circles: {unknown}"


def test_nothing_imports_against_the_dependency_direction():
    assert upward_imports(import_graph()) == []


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_the_checks_see_a_circle_and_an_upward_import():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward_imports({"telefuser.models.x": {"telefuser.runtime.y"}}) == [
        "telefuser.models.x imports telefuser.runtime.y"]


if __name__ == "__main__":
    graph = import_graph()
    print("circles:", circles(graph))
    print("upward:", "\n  ".join(upward_imports(graph)))
