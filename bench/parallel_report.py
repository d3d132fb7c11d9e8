"""The table of bench/parallel.py (the runner): one row per model and layout, speedups against the same side's 1-GPU
step, TeleFuser against diffusers, correctness against the 1-GPU prediction, and the targets."""

from __future__ import annotations

import datetime
from typing import Any, Optional

CFG_SCALE = 5.0
TARGETS = {("cfg", 2): 1.9, ("ulysses", 2): 1.9, ("ring", 2): 1.8}  # speedup at 2 GPUs, and faster than diffusers


def _fmt_s(m: Optional[dict[str, Any]]) -> str:
    return f"{m['s']:.3f}" if m else ""


def _speedup(m: Optional[dict[str, Any]], base: Optional[dict[str, Any]]) -> tuple[str, Optional[float]]:
    if not m or not base:
        return "", None
    if "ok" in m and not m["ok"]:
        return "invalid (WRONG output)", None
    value = base["s"] / m["s"]
    return f"{value:.2f}x", value


def render(bench) -> str:
    """The markdown of a runner's results: `bench` has rows, env, diffusers_version, backend, args (warmup, steps),
    world, tolerance and notes (bench/parallel.py's Bench)."""
    diffusers = (f"diffusers {bench.diffusers_version} (attention backend `{bench.backend}`)"
                 if bench.diffusers_version else "diffusers not measured")
    lines = [f"Measured: {bench.env}; {diffusers}; {bench.args.warmup} warm-up + {bench.args.steps} timed steps per "
             f"layout (median of the slowest rank's step time); generated {datetime.datetime.now():%Y-%m-%d %H:%M}.", ""]
    seen: dict[str, dict[str, Any]] = {}
    for row in bench.rows:
        seen.setdefault(row["model"], row)
    for row in seen.values():
        lines.append(f"- {row['title']}: latent {row['latent']} ({row['tokens']:,} tokens), {row['layers']} layers, "
                     f"dim {row['dim']}, {row['heads']} heads; text [1, {row['text_len']}, ...] per branch (cond, "
                     f"uncond); TeleFuser: two batch-1 forwards per step (one per rank under cfg 2), diffusers: one "
                     f"batch-2 forward; CFG scale {CFG_SCALE:g}.")
    lines += ["", "| model | layout | GPUs | TeleFuser s/step | speedup | diffusers s/step | speedup | ours/diffusers "
              "| peak GiB/GPU (ours, diffusers) | max\\|diff\\| vs 1 GPU (ours; diffusers) | target |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    bases = {r["model"]: r for r in bench.rows if r["gpus"] == 1}
    for row in bench.rows:
        base = bases.get(row["model"], {})
        ours, theirs = row.get("ours"), row.get("diffusers")
        if row.get("skipped"):
            lines.append(f"| {row['title']} | {row['layout']} | {row['gpus']} | skipped: {row['skipped']} "
                         "| | | | | | | |")
            continue
        ours_up, ours_value = _speedup(ours, base.get("ours")) if row["gpus"] > 1 else ("1.00x" if ours else "", 1.0)
        theirs_up, _ = _speedup(theirs, base.get("diffusers")) if row["gpus"] > 1 else ("1.00x" if theirs else "", 1.0)
        # ours/diffusers: the same layout, or (cfg layouts, which diffusers lacks) diffusers' best on as many GPUs
        peer, peer_label = theirs, ""
        if peer is None and ours and row["gpus"] > 1:
            same = [r["diffusers"] for r in bench.rows if r["model"] == row["model"] and r["gpus"] == row["gpus"]
                    and r.get("diffusers") and r["diffusers"].get("ok", True)]
            if same:
                peer = min(same, key=lambda m: m["s"])
                peer_label = f" (vs diffusers' best on {row['gpus']})"
        ratio = ""
        if ours and peer:
            wrong = not (ours.get("ok", True) and peer.get("ok", True))
            ratio = "invalid (WRONG output)" if wrong else f"{ours['s'] / peer['s']:.2f}x{peer_label}"
        peaks = ", ".join(f"{m['peak_gib']:.1f}" if m and m.get("peak_gib") is not None else "-"
                          for m in (ours, theirs))
        checks = []
        for m, error in ((ours, row.get("ours_error")), (theirs, row.get("diffusers_error"))):
            if m and "rel" in m:
                checks.append(f"{m['max_abs']:.1e} (rel {m['rel']:.1e}){'' if m['ok'] else ' WRONG'}")
            elif row["gpus"] == 1 and m:
                checks.append("reference")
            else:
                checks.append(error or "-")
        if row["gpus"] == 1 and "cross" in row:
            checks.append(f"TeleFuser vs diffusers: rel {row['cross']['rel']:.1e}")
        target = ""
        wanted = TARGETS.get((row["kind"], row["gpus"]))
        if wanted is not None:
            fast_enough = ours_value is not None and ours_value >= wanted
            if peer is None:
                target = f">= {wanted}x: {'met' if fast_enough else 'MISSED'}; faster than diffusers: not measured"
            else:
                met = fast_enough and peer.get("ok", True) and ours is not None and ours["s"] < peer["s"]
                target = f">= {wanted}x and faster than diffusers: {'met' if met else 'MISSED'}"
        errors = [e for e in (row.get("ours_error"), row.get("diffusers_error")) if e and not (ours or theirs)]
        lines.append(f"| {row['title']} | {row['layout']} | {row['gpus']} | {_fmt_s(ours) or (errors[0] if errors else '')} "
                     f"| {ours_up} | {_fmt_s(theirs)} | {theirs_up} | {ratio} | {peaks} | {'; '.join(checks)} | {target} |")
    lines += ["", f"Layouts on fewer GPUs than the machine's {bench.world} run as identical replicas at once (a dp "
              "dimension); 1-GPU rows: every GPU runs the step alone at once. Correctness: a layout's CFG prediction "
              f"(float32) against the same side's 1-GPU prediction; WRONG above a relative L2 error of "
              f"{bench.tolerance:g}. Targets at 2 GPUs: cfg and ulysses >= 1.9x, ring >= 1.8x, each faster than "
              "diffusers (cfg against diffusers' best 2-GPU layout)."]
    lines += [f"- {note}" for note in bench.notes]
    return "\n".join(lines)
