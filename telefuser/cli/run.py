"""`telefuser-run PLAN --prompt ... -o out.mp4`: the options are the plan's Layer 3 parameters.

The plan path is parsed first; the real parser is then built from the plan, so
`telefuser-run plan.json --help` lists that plan's parameters, defaults and choices.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from telefuser.cli.errors import exit_now_if_interrupted, exiting_on_signals, forced_exit_after, guarded, report
from telefuser.errors import TeleFuserError

PROG = "telefuser-run"
DESCRIPTION = "Run a compiled TeleFuser plan and write an mp4."
EPILOG = """examples:
  telefuser-compile recipes/tiny.toml -o plan.json
  telefuser-run plan.json --prompt "a red fox in fresh snow" --seed 7 -o fox.mp4
  telefuser-run plan.json --prompts prompts.txt -o videos/      one video per line of prompts.txt

several devices: a plan compiled for N ranks (layer2.parallel_config) starts its N local processes
itself and returns one exit code; rank 0 prints and writes. Under torchrun it joins instead:
  torchrun --nproc-per-node N $(which telefuser-run) plan.json --prompt "..." -o out.mp4
A rank that fails stops every rank, with one message naming it.

weights: a plan compiled with `telefuser-compile --hash-weights` records each weight file's SHA-256;
telefuser-run then reads every file once and checks it before loading (--no-verify-weights skips that).
Without hashes, each file's size and safetensors header are still checked (a same-size file with the
same header but other tensor bytes is only caught with hashes). With several ranks the launching
process verifies once, before the ranks start.

exit codes: 0 success; 2 bad input: a bad option or value, an edited or stale plan, a plan of another
format version, missing/changed/damaged weights, an unwritable output or full disk, out of memory
(one-paragraph message, no partial mp4 is left); 130 / 143 interrupted by Ctrl-C / SIGTERM (the
process stops within about two seconds and leaves no partial or temporary file); another code with
several ranks: the failed rank's."""
# Every Layer 3 parameter a plan may declare: the pre-parser must know which options take a value.
LAYER3_OPTIONS = ("prompt", "negative_prompt", "seed", "resolution", "aspect_ratio", "image")


class _Parser(argparse.ArgumentParser):
    """argparse, with any huge value it echoes in an error (a 5,000-digit --seed) cut short."""

    def error(self, message: str):
        message = re.sub(r"\S{81,}", lambda m: f"{m.group()[:40]}...({len(m.group()):,} characters)", message)
        super().error(message)


def _shown_default(plan, name: str, default):
    # An empty Layer 3 negative prompt falls back to Layer 2's (telefuser.runtime.io.params).
    if name == "negative_prompt" and not default:
        return plan.layer2_inference_config.negative_prompt
    return default


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _pre_parser() -> argparse.ArgumentParser:
    pre = _Parser(
        prog=PROG, description=DESCRIPTION, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG)
    pre.add_argument("plan", nargs="?", help="a plan JSON written by telefuser-compile")
    pre.add_argument("-h", "--help", action="store_true", help="show help; after a plan, that plan's parameters")
    pre.add_argument("-o", "--output", help="the mp4 to write (atomically)")
    for name in LAYER3_OPTIONS:
        pre.add_argument(_option(name), help=f"the plan's {name.replace('_', ' ')} parameter (if it declares one)")
    pre.add_argument("--prompts", metavar="FILE", help="prompts, one per line: a video each (-o is then a folder)")
    pre.add_argument("--verify-weights", action=argparse.BooleanOptionalAction, default=None,
                     help="check each weight file's SHA-256 recorded by telefuser-compile --hash-weights before "
                          "loading (default: on when the plan records them)")
    return pre


def build_parser(plan) -> argparse.ArgumentParser:
    """The parser of one plan: an option per Layer 3 parameter, with its type, default and choices."""
    ranks = f", {plan.mesh.world_size} ranks" if plan.mesh.world_size > 1 else ""
    parser = _Parser(
        prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{DESCRIPTION} Plan: recipe {plan.recipe.name!r}, {plan.pipeline_type} on {plan.device}{ranks}.",
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
        if spec.required and name != "prompt":  # --prompts stands in for --prompt
            kwargs["required"] = True
        elif name == "image":  # an optional image (Wan2.2 TI2V): without one the run is text-to-video
            kwargs["default"] = None
            kwargs["help"] += " (optional: without it, text-to-video)"
        else:
            kwargs["default"] = None  # None: the plan's default, resolved by the runtime
            kwargs["help"] += f" (default: {_shown_default(plan, name, spec.default)!r})"
        parser.add_argument(_option(name), dest=name, metavar=name.upper() if not spec.choices else None, **kwargs)
    if "prompt" in params:
        parser.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one per line ('#' lines and "
                            "blank lines skipped): one video each, same seed and settings, split across the "
                            "plan's dp replicas; -o is then a folder")
    if "image" not in params:  # refused with a message saying why (a text-to-video plan), not argparse's
        parser.add_argument("--image", dest="image", default=None, help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", required=True,
                        help="the mp4 to write (written atomically); with --prompts, the folder for the videos")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    hashed = "this plan records them: on by default" if _records_sha256(plan) else \
        "this plan records none (compiled without --hash-weights): nothing to verify"
    parser.add_argument("--verify-weights", action=argparse.BooleanOptionalAction, default=None,
                        help="before loading, read every weight file and check the SHA-256 that telefuser-compile "
                             f"--hash-weights recorded ({hashed}); a file that differs is refused with exit code 2")
    return parser


def _records_sha256(plan) -> bool:
    from telefuser.runtime.plan_io import plan_records_sha256

    return plan_records_sha256(plan)


def _parse(plan, argv: list[str]) -> argparse.Namespace:
    parser = build_parser(plan)
    args = parser.parse_args(argv)  # argparse itself exits 2 on a bad value
    if "image" not in plan.layer3_user_interface.parameters and args.image is not None:
        from telefuser.runtime.io.params import image_not_taken

        raise image_not_taken(plan, args.image)
    if "prompt" in plan.layer3_user_interface.parameters:
        if args.prompt is not None and args.prompts is not None:
            parser.error("give --prompt or --prompts, not both")
        if args.prompt is None and args.prompts is None and plan.layer3_user_interface.parameters["prompt"].required:
            parser.error("the following arguments are required: --prompt (or --prompts FILE)")
    else:
        args.prompts = None
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    # From here on SIGINT and SIGTERM unwind as exceptions: exit 130 / 143, nothing half-written.
    with exiting_on_signals():
        code = guarded(PROG, lambda: _main(list(sys.argv[1:] if argv is None else argv)))
    # The command's own process, interrupted: everything is cleaned up, skip the interpreter's slow teardown.
    return exit_now_if_interrupted(code) if argv is None else code


def _main(argv: list[str]) -> int:
    pre, _ = _pre_parser().parse_known_args(argv)
    if pre.plan is None:
        if pre.help:
            _pre_parser().print_help()
            print("\nGive a plan first (telefuser-run PLAN --help) to see its parameters.")
            return 0
        return report(PROG, "no plan given; usage: telefuser-run PLAN --prompt TEXT -o OUT.mp4 "
                            "(telefuser-run PLAN --help lists that plan's parameters)")
    from telefuser.runtime.plan_io import check_plan_hash, read_plan

    try:
        plan, raw = read_plan(pre.plan)
        check_plan_hash(plan, raw, pre.plan)  # before anything trusts its content (the weights' hashes)
    except TeleFuserError as exc:
        return report(PROG, str(exc))
    args = _parse(plan, argv)
    rank = os.environ.get("RANK")
    if plan.mesh.world_size > 1 and rank is None:
        # N ranks on this host: refuse bad input once, here, then start them (each runs this command).
        return guarded(PROG, lambda: _launch(args, plan, argv))
    prog = PROG if plan.mesh.world_size == 1 or rank is None else f"{PROG} (rank {rank})"
    return guarded(prog, lambda: _run(args, plan, prog))


def _check_texts(args: argparse.Namespace, plan) -> None:
    from telefuser.runtime.io.params import PROMPT_PARAMETERS, check_prompts, check_text

    check_prompts(plan, {name: getattr(args, name, None) for name in PROMPT_PARAMETERS})
    check_text("-o/--output", args.output, path=True)
    check_text("--prompts", getattr(args, "prompts", None), path=True)
    check_text("--image", getattr(args, "image", None), path=True)


def _check_before_loading(args: argparse.Namespace, plan) -> dict:
    """Refuse bad values, unwritable outputs, a machine that lacks the plan's devices and changed weights,
    before loading; the weights' SHA-256 last (it reads every file)."""
    from .batch import output_folder, read_prompts
    from telefuser.runtime.io.params import check_text, resolve_parameters
    from telefuser.runtime.plan_io import check_fingerprints, check_target
    from telefuser.runtime.io.video import check_output_path

    _check_texts(args, plan)
    values = {name: getattr(args, name) for name in plan.layer3_user_interface.parameters}
    if values.get("image") is not None:
        from telefuser.runtime.io.image import as_image

        # Read and checked once (before any rank starts or model loads), then shared by every prompt.
        values["image"] = as_image(values["image"])
    if args.prompts is not None:
        values.pop("prompt")
        values["prompts"] = read_prompts(args.prompts)
        output_folder(args.output)
        for line, prompt in enumerate(values["prompts"], 1):
            check_text(f"prompt {line} of --prompts {args.prompts!r}", prompt,
                       text_len=plan.layer2_inference_config.text_len)
            resolve_parameters(plan, prompt=prompt, **{k: v for k, v in values.items() if k != "prompts"})
    else:
        check_output_path(args.output)
        resolve_parameters(plan, **values)
    check_target(plan)
    check_fingerprints(plan)
    _verify_weights(args, plan)
    return values


def _verify_weights(args: argparse.Namespace, plan) -> None:
    """--verify-weights (default: when the plan records SHA-256s): read and hash every weight file."""
    from telefuser.runtime.plan_io import RECOMPILE, plan_records_sha256, verify_weight_hashes
    from telefuser.errors import ParameterError

    hashed = plan_records_sha256(plan)
    if args.verify_weights is False:
        return
    if not hashed:
        if args.verify_weights:
            raise ParameterError(
                f"--verify-weights: plan {args.plan!r} records no SHA-256 of its weight files, so there is nothing to "
                f"check them against; {RECOMPILE.replace('RECIPE', '--hash-weights RECIPE')}, or drop --verify-weights."
            )
        return
    verify_weight_hashes(plan, progress=not args.no_progress)


def _launch(args: argparse.Namespace, plan, argv: list[str]) -> int:
    from telefuser.distributed.launch import spawn_local_ranks

    _check_before_loading(args, plan)  # the weights' hashes included: once here, not in every rank
    return spawn_local_ranks([*argv, "--no-verify-weights"], plan.mesh.world_size)


def _run(args: argparse.Namespace, plan, prog: str = PROG) -> int:
    from telefuser.runtime.api import load_plan

    with forced_exit_after(prog):  # a signal that cannot unwind in time still ends the process, cleanly
        values = _check_before_loading(args, plan)
        pipeline = load_plan(args.plan, verify_weights=False)  # checked by _check_before_loading
        try:
            if "prompts" in values:
                return _run_batch(pipeline, values, Path(args.output), not args.no_progress)
            video = pipeline.run(**values, progress=not args.no_progress)
            if video is None:  # a rank other than 0: rank 0 writes and reports
                return 0
            written = video.save(args.output)
        finally:
            pipeline.close()
    print(f"wrote {written} ({video.num_frames} frames, {video.size[0]}x{video.size[1]}, {video.fps} fps)")
    print(video.timings.summary())
    return 0


def _run_batch(pipeline, values: dict, folder: Path, progress: bool) -> int:
    """Each dp replica's lead writes its own videos as they finish; rank 0 lists them all at the end."""
    from .batch import video_name

    prompts = values.pop("prompts")
    start = time.perf_counter()
    written = []
    for index, video in pipeline.run_many(prompts, **values, progress=progress):
        path = video.save(folder / video_name(index, prompts[index]))
        written.append((index, str(path), video.num_frames, video.size, sum(video.timings.steps)))
    everything = sorted(w for rank_written in pipeline.rank.gather_to_rank0(written) for w in rank_written)
    for index, path, frames, (width, height), denoise in everything:
        print(f"wrote {path} ({frames} frames, {width}x{height}; denoise {denoise:.2f} s)")
    if pipeline.rank.rank == 0:
        print(f"{len(everything)} videos in {time.perf_counter() - start:.2f} s "
              f"over {pipeline.rank.degree('dp')} dp replica(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
