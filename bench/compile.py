"""Compile-time benchmark (CPU): per shipped recipe, and `--check recipes/` as one command.

In-process times exclude interpreter start; the `--check` figure is the whole
command (interpreter start included), as CI sees it. Recipes whose weights are
not on this machine are compiled with --no-weights (all but tiny.toml, here).
Run: `python bench/compile.py` (prints a markdown table).
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from telefuser.compiler import compile_recipe
from telefuser.errors import WeightsError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def median_seconds(fn, runs: int = 7) -> float:
    fn()  # warm: imports and caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rows = []
    for path in sorted(RECIPES.glob("*.toml")):
        try:
            compile_recipe(path)
            weights = True
        except WeightsError:
            weights = False
        seconds = median_seconds(lambda: compile_recipe(path, inspect_weights=weights))
        rows.append(f"| {path.name} | {'headers read' if weights else '--no-weights'} | {seconds * 1e3:.1f} |")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "telefuser.cli.compile", "--check", "--no-weights", str(RECIPES)],
                   check=True, capture_output=True)
    check = time.perf_counter() - start
    print(f"Measured on {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"{datetime.date.today().isoformat()} (median of 7, in-process):\n")
    print("| recipe | weights | compile ms |\n|---|---|---|")
    print("\n".join(rows))
    print(f"\n`telefuser-compile --check --no-weights recipes/` ({len(rows)} recipes), whole command: {check:.2f} s")


if __name__ == "__main__":
    main()
