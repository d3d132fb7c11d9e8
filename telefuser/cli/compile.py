"""`telefuser-compile`: recipe -> plan, and the tools around plans."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from telefuser.errors import RecipeError, TeleFuserError

from .errors import USAGE_ERROR, exiting_on_signals, guarded, report

PROG = "telefuser-compile"
EPILOG = """\
examples:
  telefuser-compile recipes/wan21_t2v_1.3b.toml -o plan.json
  telefuser-compile recipes/wan21_t2v_1.3b.toml -o plan.json --set layer2.num_inference_steps=20 --target h100
  telefuser-compile recipes/wan21_t2v_1.3b.toml -o plan.json --hash-weights   record each file's SHA-256
  telefuser-compile --check recipes/                 validate every recipe (one line each)
  telefuser-compile --check --no-weights recipes/    ... without the weight files (CI)
  telefuser-compile --explain plan.json              readable summary of a plan
  telefuser-compile --diff a.json b.json             what differs, semantically

targets (--target): cpu, cuda, auto (this machine), or a GPU preset: h100, h200, a100, l40s, rtx4090, b200.
exit codes: 0 success, 1 --check found bad recipes or --diff found differences, 2 bad input,
130 / 143 interrupted by Ctrl-C / SIGTERM (no partial plan is left).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile a TeleFuser recipe (TOML) into a frozen plan (JSON) that telefuser-run executes.",
    )
    p.add_argument("paths", nargs="*", metavar="RECIPE",
                   help="the recipe .toml to compile (with --check: any number of recipe files or folders)")
    p.add_argument("-o", "--output", help="where to write the plan (written atomically); '-' prints it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. layer2.num_inference_steps=4 (repeatable; typed by the schema)")
    p.add_argument("--target", metavar="TARGET", help="override the recipe's target: cpu, cuda, auto or a GPU preset")
    p.add_argument("--hash-weights", action="store_true",
                   help="also record each weight file's full SHA-256 in the plan (reads every file once); "
                        "telefuser-run then checks them before loading and refuses a file that changed in any byte")
    p.add_argument("--no-weights", action="store_true",
                   help="skip reading weight headers (for --check where the weights are absent)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="validate the recipes given (files or folders), one line each")
    mode.add_argument("--explain", metavar="PLAN", help="print a readable summary of a plan")
    mode.add_argument("--diff", nargs=2, metavar=("A", "B"), help="print what differs between two plans")
    return p


def _target(spec: Optional[str], recipe_target):
    if spec is None:
        return None
    from telefuser.schema.targets import GPU_PRESETS

    update: dict = {"gpu": None, "compute_capability": None, "memory_gib": None}
    if spec.lower() in ("cpu", "cuda", "auto"):
        update["device"] = spec.lower()
        if spec.lower() == "cuda":
            update.update(gpu=recipe_target.gpu, compute_capability=recipe_target.compute_capability,
                          memory_gib=recipe_target.memory_gib)
    elif spec.upper() in {k.upper() for k in GPU_PRESETS}:
        update.update(device="cuda", gpu=next(k for k in GPU_PRESETS if k.upper() == spec.upper()))
    else:
        raise RecipeError(f"--target {spec!r}: use cpu, cuda, auto, or a GPU preset ({', '.join(GPU_PRESETS)}).")
    return recipe_target.model_copy(update=update)


def _compile(args: argparse.Namespace) -> int:
    from telefuser.compiler import compile_loaded, load_recipe
    from telefuser.schema.canonical import pretty_json

    from .output import write_text_atomic

    if not args.output:
        raise RecipeError("say where to write the plan: -o plan.json (or -o - to print it).")
    if len(args.paths) != 1:
        raise RecipeError(f"compile one recipe at a time (got {len(args.paths)}); use --check to validate several.")
    if args.no_weights:
        raise RecipeError("--no-weights is for --check only: a plan records the weights' architecture and fingerprints, "
                          "so point the recipe's model paths at real files (or set TELEFUSER_MODEL_ROOT) and drop --no-weights.")
    loaded = load_recipe(args.paths[0], args.overrides)
    target = _target(args.target, loaded.recipe.target)
    if args.hash_weights:
        from telefuser.schema.fingerprint import recording_sha256

        with recording_sha256():
            plan = compile_loaded(loaded, target=target)
    else:
        plan = compile_loaded(loaded, target=target)
    text = pretty_json(plan.model_dump(mode="json", by_alias=True))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        write_text_atomic(args.output, text)
        print(f"{PROG}: wrote {args.output} (plan {plan.plan_hash[:16]}, {len(plan.stages)} stages, "
              f"peak {plan.memory.peak_bytes / 2**30:.2f} GiB of {plan.memory.capacity_bytes / 2**30:.1f} GiB)", file=sys.stderr)
    return 0


def _recipe_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.toml") if p.is_file())
        else:
            files.append(path)
    return files


def _check(args: argparse.Namespace) -> int:
    from telefuser.compiler import compile_loaded, load_recipe

    if args.hash_weights:
        raise RecipeError("--hash-weights records hashes in a plan; --check writes none, so drop it.")
    files = _recipe_files(args.paths)
    if not files:
        raise RecipeError(f"--check found no .toml recipes under {', '.join(args.paths) or '(no path given)'}.")
    bad = 0
    for path in files:
        start = time.perf_counter()
        try:
            loaded = load_recipe(path, args.overrides)
            plan = compile_loaded(loaded, inspect_weights=not args.no_weights,
                                  target=_target(args.target, loaded.recipe.target))
            print(f"ok    {path}  ({plan.pipeline_type}, {len(plan.layer1_model_definition.models)} models, "
                  f"{(time.perf_counter() - start) * 1000:.0f} ms)")
        except TeleFuserError as exc:
            bad += 1
            print(f"FAIL  {path}: {exc}")
    print(f"{len(files) - bad} ok, {bad} failed")
    return 1 if bad else 0


def _explain(args: argparse.Namespace) -> int:
    from telefuser.compiler.explain import explain, read_plan_file

    print(explain(read_plan_file(args.explain)[0]))
    return 0


def _diff(args: argparse.Namespace) -> int:
    from telefuser.compiler.explain import diff, read_plan_file

    (_, a), (_, b) = read_plan_file(args.diff[0]), read_plan_file(args.diff[1])
    lines = diff(a, b)
    print("\n".join(lines) if lines else "no semantic differences (timestamps and hashes aside)")
    return 1 if lines else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage; keep its code (0 for --help, 2 otherwise)
        return int(exc.code or 0)
    if args.check:
        body = lambda: _check(args)  # noqa: E731
    elif args.explain:
        body = lambda: _explain(args)  # noqa: E731
    elif args.diff:
        body = lambda: _diff(args)  # noqa: E731
    elif args.paths:
        body = lambda: _compile(args)  # noqa: E731
    else:
        return report(PROG, "give a recipe to compile (or --check/--explain/--diff); see --help.")
    with exiting_on_signals():  # SIGTERM unwinds like Ctrl-C: exit 143, no partial plan
        return guarded(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
