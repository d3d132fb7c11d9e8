"""`telefuser-run PLAN --prompt ... -o out.mp4`: the options are the plan's Layer 3 parameters.

The plan path is parsed first; the real parser is then built from the plan, so
`telefuser-run plan.json --help` lists that plan's parameters, defaults and choices.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from telefuser.cli.errors import guarded, report
from telefuser.errors import TeleFuserError

PROG = "telefuser-run"
DESCRIPTION = "Run a compiled TeleFuser plan and write an mp4."
# Every Layer 3 parameter a plan may declare: the pre-parser must know which options take a value.
LAYER3_OPTIONS = ("prompt", "negative_prompt", "seed", "resolution", "aspect_ratio", "image")


def _shown_default(plan, name: str, default):
    # An empty Layer 3 negative prompt falls back to Layer 2's (telefuser.runtime.params).
    if name == "negative_prompt" and not default:
        return plan.layer2_inference_config.negative_prompt
    return default


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _pre_parser() -> argparse.ArgumentParser:
    pre = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  telefuser-compile recipes/tiny.toml -o plan.json\n"
               "  telefuser-run plan.json --prompt \"a red fox in fresh snow\" --seed 7 -o fox.mp4\n\n"
               "exit codes: 0 success, 2 bad input (one-paragraph message; no partial mp4 is left).")
    pre.add_argument("plan", nargs="?", help="a plan JSON written by telefuser-compile")
    pre.add_argument("-h", "--help", action="store_true", help="show help; after a plan, that plan's parameters")
    pre.add_argument("-o", "--output", help="the mp4 to write (atomically)")
    for name in LAYER3_OPTIONS:
        pre.add_argument(_option(name), help=f"the plan's {name.replace('_', ' ')} parameter (if it declares one)")
    return pre


def build_parser(plan) -> argparse.ArgumentParser:
    """The parser of one plan: an option per Layer 3 parameter, with its type, default and choices."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=f"{DESCRIPTION} Plan: recipe {plan.recipe.name!r}, {plan.pipeline_type} on {plan.device}.",
    )
    parser.add_argument("plan", help="the plan JSON (written by telefuser-compile)")
    params = plan.layer3_user_interface.parameters
    order = {name: i for i, name in enumerate(LAYER3_OPTIONS)}
    for name in sorted(params, key=lambda n: order.get(n, len(order))):
        spec = params[name]
        kwargs: dict = {"help": spec.description or name.replace("_", " ")}
        if spec.type == "integer":
            kwargs["type"] = int
            if spec.minimum is not None or spec.maximum is not None:
                kwargs["help"] += f" (range {spec.minimum}..{spec.maximum})"
        if spec.choices:
            kwargs["choices"] = spec.choices
        if spec.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = None  # None: the plan's default, resolved by the runtime
            kwargs["help"] += f" (default: {_shown_default(plan, name, spec.default)!r})"
        parser.add_argument(_option(name), dest=name, metavar=name.upper() if not spec.choices else None, **kwargs)
    parser.add_argument("-o", "--output", required=True, help="the mp4 to write (written atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = _pre_parser().parse_known_args(argv)
    if pre.plan is None:
        if pre.help:
            _pre_parser().print_help()
            print("\nGive a plan first (telefuser-run PLAN --help) to see its parameters.")
            return 0
        return report(PROG, "no plan given; usage: telefuser-run PLAN --prompt TEXT -o OUT.mp4 "
                            "(telefuser-run PLAN --help lists that plan's parameters)")
    from telefuser.runtime.plan_io import read_plan

    try:
        plan, _raw = read_plan(pre.plan)
    except TeleFuserError as exc:
        return report(PROG, str(exc))
    args = build_parser(plan).parse_args(argv)  # argparse itself exits 2 on a bad value
    rank = os.environ.get("RANK")
    if plan.mesh.world_size > 1 and rank is None:
        # N ranks on this host: refuse bad input once, here, then start them (each runs this command).
        return guarded(PROG, lambda: _launch(args, plan, argv))
    prog = PROG if plan.mesh.world_size == 1 or rank is None else f"{PROG} (rank {rank})"
    return guarded(prog, lambda: _run(args, plan))


def _check_before_loading(args: argparse.Namespace, plan) -> dict:
    """Refuse bad values, unwritable outputs and a machine that lacks the plan's devices, before loading."""
    from telefuser.runtime.params import resolve_parameters
    from telefuser.runtime.plan_io import check_target
    from telefuser.runtime.video import check_output_path

    values = {name: getattr(args, name) for name in plan.layer3_user_interface.parameters}
    check_output_path(args.output)
    resolve_parameters(plan, **values)
    check_target(plan)
    return values


def _launch(args: argparse.Namespace, plan, argv: list[str]) -> int:
    from telefuser.distributed.launch import spawn_local_ranks

    _check_before_loading(args, plan)
    return spawn_local_ranks(argv, plan.mesh.world_size)


def _run(args: argparse.Namespace, plan) -> int:
    from telefuser.runtime.api import load_plan

    values = _check_before_loading(args, plan)
    pipeline = load_plan(args.plan)
    try:
        video = pipeline.run(**values, progress=not args.no_progress)
        if video is None:  # a rank other than 0: rank 0 writes and reports
            return 0
        written = video.save(args.output)
    finally:
        pipeline.close()
    print(f"wrote {written} ({video.num_frames} frames, {video.size[0]}x{video.size[1]}, {video.fps} fps)")
    print(video.timings.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
