"""Text encoders streamed block by block (issue 22): time per video and peak memory per stage, streamed against
resident, on one GPU, full-size random weights.

Part `wan`: Wan2.1-14B T2V at 480p 16:9 (832x480), 81 frames, text_len 512, CFG, 2 UniPC steps (the step count does
not change the encoder's cost; a 50-step video adds 48 more steps of the same time to every row), the DiT
ASYNC_CPU_OFFLOAD in every row, through the shipped `recipes/wan21_t2v_14b_480p_8gib.toml` with these files:
  - umT5-XXL resident (NO_CPU_OFFLOAD; the plan compiled for 24 GiB, since it does not fit 8),
  - umT5-XXL MODEL_CPU_OFFLOAD (the status quo: 11.8 GiB peak in its stage; compiled for 24 GiB),
  - umT5-XXL ASYNC_CPU_OFFLOAD (the shipped 8 GiB plan) and SEQUENTIAL_CPU_OFFLOAD (8 GiB).
Each plan runs two videos; the second is reported (the first pays Triton's JIT and first-call setup): seconds per
video (pipe.run, load excluded), the encode stage, s / step, and each stage's torch.cuda.max_memory_allocated /
max_memory_reserved (reset as each stage starts, bench/memory.py's StagePeaks) beside the plan's estimate.
Files: bench/weights_random.write_wan21_diffusers under $WAN_MEMORY_ROOT (bench/memory.py's, reused when present).
Targets: the 8 GiB plan's run peak within 8 GiB; its video at most 10% slower than the resident encoder's.

Part `hy15_text`: the HunyuanVideo-1.5 T2V + SR plan at 24 GiB does not fit one 10-minute call beside part `wan`
(about 50 GB of files, and a 121-frame 480p video with its 720p SR stage), so only its text-encoder stage:
Qwen2.5-VL-7B (the 26 layers run, random bf16 weights built in memory) encoding the templated prompt for both CFG
branches (text_len from the recipe), resident, MODEL_CPU_OFFLOAD and ASYNC_CPU_OFFLOAD as
`recipes/hunyuan15_t2v_480p_sr_720p_24gib.toml` plans it (compiled against header-only files of the published
shapes, bench/hy15_files); the streamed model placed by the runtime's own Placement. Median of 3 timed stage runs
after one warm-up; peak allocated during a run.

Part `hy15_plan` (not in the default; its own call: `--part hy15_plan`, writes about 50 GB under `--root` after
removing part `wan`'s files): the shipped 24 GiB HunyuanVideo-1.5 T2V + SR plan run whole on random files, 4 base +
2 SR steps, the first video: each stage's peak against the plan's estimate (target: within 24 GiB) and its times.

Run on the device (one call, about 6-8 minutes with the files to write): `PYTHONPATH=. python3
bench/encoder_streaming.py [--part wan hy15_text] [--budget-s 560]`; `--cpu-smoke` runs the same logic at tiny sizes
on the CPU (all three parts with `--part wan hy15_text hy15_plan`). Writes $OUT/encoder_streaming.md and .json
after every row.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import compile_shipped, free, offload_overrides, out_dir, size_overrides, sync

BF16 = torch.bfloat16
PROMPT = "a red fox running through fresh snow at dawn, its breath steaming, pine trees behind"
STATE = {"smoke": False, "deadline": math.inf, "device": "cuda"}
ROWS: dict[str, list[str]] = {}
RAW: list[dict] = []


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def left() -> float:
    return STATE["deadline"] - time.monotonic()


def emit(part: str, row: str, record: dict) -> None:
    """Keep a row and write both outputs now (a call cut short still returns what it measured)."""
    ROWS.setdefault(part, []).append(row)
    RAW.append({"part": part, **record})
    write_outputs()
    print(row, flush=True)


HEADERS = {
    "wan": ["## Wan2.1-14B 480p x 81 frames, 2 steps, DiT ASYNC_CPU_OFFLOAD; the text encoder's mode per row", "",
            "| umT5-XXL | plan for | s / video | encode s | s / step | run peak allocated / reserved GiB | plan "
            "estimate GiB | per stage: allocated / reserved, estimate GiB |", "|---|---|---|---|---|---|---|---|"],
    "hy15_plan": ["## HunyuanVideo-1.5 T2V + SR, the 24 GiB plan whole (4 base + 2 SR steps, first video)", "",
                  "| recipe | s / video | encode s | base + SR steps s | run peak allocated GiB | plan estimate GiB | per "
                  "stage: allocated / reserved, estimate GiB |", "|---|---|---|---|---|---|---|"],
    "hy15_text": ["## HunyuanVideo-1.5: the Qwen2.5-VL-7B text stage (2 CFG branches)", "",
                  "| Qwen2.5-VL | stage s (median of 3) | peak allocated GiB | plan's estimate for the encoder "
                  "(in use + activations) GiB |", "|---|---|---|---|"],
}


def write_outputs() -> None:
    from bench.common import environment

    env = f"CPU smoke run, PyTorch {torch.__version__}" if STATE["smoke"] else environment()
    lines = [f"Measured: {env}; random weights.", ""]
    for part, rows in ROWS.items():
        lines += [*HEADERS[part], *rows, ""]
    (out_dir() / "encoder_streaming.md").write_text("\n".join(lines))
    (out_dir() / "encoder_streaming.json").write_text(json.dumps({"environment": env, "rows": RAW}, indent=1))


# ------------------------------------------------------------------------------------------------ part wan

WAN_ROWS = (  # label, text encoder offload_config, target memory (GiB) the plan is compiled for
    ("NO_CPU_OFFLOAD (resident)", {"offload_type": "NO_CPU_OFFLOAD"}, 24),
    ("MODEL_CPU_OFFLOAD", {"offload_type": "MODEL_CPU_OFFLOAD"}, 24),
    ("ASYNC_CPU_OFFLOAD", {"offload_type": "ASYNC_CPU_OFFLOAD"}, 8),
    ("SEQUENTIAL_CPU_OFFLOAD", {"offload_type": "SEQUENTIAL_CPU_OFFLOAD"}, 8),
)


def part_wan() -> None:
    import telefuser
    from bench.memory import Setup, StagePeaks
    from bench.weights_random import write_wan21_diffusers

    setup = Setup(STATE["smoke"], "wan21")
    paths = write_wan21_diffusers(setup.root / "base", setup.dit, setup.vae, setup.t5, setup.device)
    files = {name: path for name, path in paths.items()}
    base = [f"layer1.models.dit.arch={{num_heads={setup.dit.num_heads}}}",
            *size_overrides(setup.frames, setup.text_len, setup.res, steps=2)]
    for label, config, memory in WAN_ROWS:
        if left() < 90:
            emit("wan", f"| {label} | skipped: {left():.0f} s left in the call | | | | | | |", {"label": label})
            continue
        target = ["target.device=cpu"] if STATE["smoke"] else [f"target.memory_gib={memory}"]
        plan_path = compile_shipped("wan21_t2v_14b_480p_8gib", setup.root / f"enc_{config['offload_type']}.plan.json",
                                    files, [*base, *target, *offload_overrides({"text_encoder": config})])
        pipe = telefuser.load_plan(str(plan_path))
        plan = pipe.plan
        for _ in range(2):  # the second video is reported
            with StagePeaks() as peaks:
                sync()
                start = time.perf_counter()
                video = pipe.run(prompt=PROMPT, seed=7, progress=False)
                sync()
                wall = time.perf_counter() - start
        t = video.timings
        estimates = {s.stage: s.peak_bytes for s in plan.memory.stages}
        allocated = max((a for a, _ in peaks.peaks.values()), default=t.peak_memory_bytes)
        reserved = max((r for _, r in peaks.peaks.values()), default=0)
        per_stage = ", ".join(f"{n} {gib(a)} / {gib(r)}" + (f" est {gib(estimates[n])}" if n in estimates else "")
                              for n, (a, r) in peaks.peaks.items())
        step = sum(t.steps) / len(t.steps)
        emit("wan", f"| {label} | {memory} GiB | {wall:.2f} | {t.encode:.2f} | {step:.2f} | {gib(allocated)} / "
                    f"{gib(reserved)} | {gib(plan.memory.peak_bytes)} | {per_stage} |",
             {"label": label, "target_gib": memory, "s_per_video": wall,
              "text_encoder_streamed_blocks": plan.placement_of("text_encoder").streamed_blocks, "encode_s": t.encode, "steps": t.steps,
              "decode_s": t.decode, "peak_allocated": allocated, "peak_reserved": reserved,
              "plan_peak": plan.memory.peak_bytes, "measured": {n: list(v) for n, v in peaks.peaks.items()},
              "estimate": {s.stage: {"peak": s.peak_bytes, "components": s.components} for s in plan.memory.stages}})
        del pipe, video
        free()


# ------------------------------------------------------------------------------------------------ part hy15_text

def _qwen_plan():
    """The text encoder's planned model and streaming from the shipped 24 GiB recipe (header-only published
    files), or for the smoke run from the tiny HunyuanVideo-1.5 recipe with the encoder streamed."""
    import os

    from telefuser.compiler import compile_recipe

    repo = Path(__file__).resolve().parents[1]
    if STATE["smoke"]:
        return compile_recipe(repo / "recipes" / "tiny_hy15.toml",
                              ["layer2.models.text_encoder.offload_config.offload_type=ASYNC_CPU_OFFLOAD"])
    from bench.hy15_files import write_hunyuan15_root

    root = Path(tempfile.mkdtemp(prefix="hy15_headers_"))
    write_hunyuan15_root(root)  # sparse headers: nothing large on disk
    os.environ["TELEFUSER_MODEL_ROOT"] = str(root)
    return compile_recipe(repo / "recipes" / "hunyuan15_t2v_480p_sr_720p_24gib.toml")


def part_hy15_text() -> None:
    from tokenizers import Tokenizer

    from bench.weights_random import random_model
    from telefuser.models.hunyuan15.qwen_text import Qwen25VLTextConfig, Qwen25VLTextEncoder
    from telefuser.runtime.memory.placement import Placement
    from telefuser.runtime.stages.hy15_text_encode import encode_text_states

    repo = Path(__file__).resolve().parents[1]
    plan = _qwen_plan()
    planned = plan.model("text_encoder")
    blocks = plan.memory.block_plan("text_encoder")
    stage = next(s for s in plan.memory.stages if s.stage == "encode_text")
    estimate = stage.components.get("in_use.text_encoder", 0) + stage.components["activations"]
    text_len = plan.layer2_inference_config.text_len
    tokenizer = Tokenizer.from_file(str(repo / "recipes" / "tiny_hy15" / "hy15_tokenizer.json"))
    device = torch.device(STATE["device"])
    dtype = torch.float32 if STATE["smoke"] else BF16
    config = Qwen25VLTextConfig(**planned.arch)
    model = random_model(lambda: Qwen25VLTextEncoder(config), device, dtype)
    host = None
    for label in ("NO_CPU_OFFLOAD (resident)", "MODEL_CPU_OFFLOAD", "ASYNC_CPU_OFFLOAD"):
        if left() < 60:
            emit("hy15_text", f"| {label} | skipped: {left():.0f} s left | | |", {"label": label})
            continue
        if label.startswith("NO"):
            placement = Placement(model, device, False, name="text_encoder")
        else:
            if host is None:  # the runtime loads offloaded / streamed models to host memory first
                host = model.cpu()
                model = None
                free()
            streamed = blocks if label.startswith("ASYNC") else None
            placement = Placement(host, device, streamed is None, name="text_encoder", pin=device.type == "cuda",
                                  blocks=streamed)

        def stage_run(placement: Placement) -> None:
            with torch.inference_mode(), placement.active() as qwen:
                for prompt in (PROMPT, ""):  # the CFG branches, as hy15_text_encode runs them
                    encode_text_states(qwen, tokenizer, prompt, text_len, device)
            sync()

        stage_run(placement)  # warm-up
        times, peak = [], 0
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            stage_run(placement)
            times.append(time.perf_counter() - start)
            peak = max(peak, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0)
        copies = placement.streamer.copies_in if placement.streamer is not None else 0
        emit("hy15_text", f"| {label} | {statistics.median(times):.3f} | {gib(peak)} | {gib(estimate)} |",
             {"label": label, "times_s": times, "peak_allocated": peak, "estimate_in_use_plus_activations": estimate,
              "group_copies": copies, "groups": len(blocks.groups) if blocks else 0, "text_len": text_len})
        if placement.streamer is not None:  # the plan's ring buffer is the runtime's
            assert blocks.group_bytes == placement.streamer.slot_bytes, (blocks.group_bytes,
                                                                          placement.streamer.slot_bytes)
        del placement
        free()


# ------------------------------------------------------------------------------------------------ part hy15_plan

def part_hy15_plan(root: Path) -> None:
    """The shipped 24 GiB HunyuanVideo-1.5 T2V + SR plan run whole on random files (bench/hunyuan15's writer: about
    50 GB under `root`, so Wan's files are removed first on a 64 GiB disk), 4 base + 2 SR steps (the estimate does not
    depend on the step counts), one video: each stage's peak against its estimate, and the stage times."""
    import os
    import shutil

    import telefuser
    from bench import hunyuan15
    from bench.hy15_files import write_hunyuan15_root
    from bench.memory import StagePeaks

    repo = Path(__file__).resolve().parents[1]
    sets = ["layer2.num_inference_steps=4", "layer2.sr_config.num_inference_steps=2"]
    if STATE["smoke"]:
        recipe = repo / "recipes" / "tiny_hy15_sr.toml"
        sets += [f"layer2.models.{m}.offload_config.offload_type=ASYNC_CPU_OFFLOAD" for m in ("dit", "dit_sr",
                                                                                              "text_encoder")]
    else:
        shutil.rmtree(os.environ.get("WAN_MEMORY_ROOT", "/tmp/wan_memory"), ignore_errors=True)
        if not (root / "done").is_file():
            hunyuan15.STATE["device"] = "cuda"
            hunyuan15.randomize_files(write_hunyuan15_root(root))
            (root / "done").write_text("ok")
        os.environ["TELEFUSER_MODEL_ROOT"] = str(root)
        recipe = repo / "recipes" / "hunyuan15_t2v_480p_sr_720p_24gib.toml"
    from telefuser.compiler import compile_recipe
    from telefuser.schema.canonical import pretty_json

    plan = compile_recipe(recipe, sets)
    path = out_dir() / "hy15_24gib.plan.json"
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    pipe = telefuser.load_plan(str(path), verify_weights=False)  # fingerprints checked; no 50 GB re-hash
    with StagePeaks() as peaks:
        sync()
        start = time.perf_counter()
        video = pipe.run(prompt='a neon shop sign that reads "OPEN" in the rain', seed=7, progress=False)
        sync()
        wall = time.perf_counter() - start
    estimates = {s.stage: s.peak_bytes for s in plan.memory.stages}
    allocated = max((a for a, _ in peaks.peaks.values()), default=0)
    per_stage = ", ".join(f"{n} {gib(a)} / {gib(r)}" + (f" est {gib(estimates[n])}" if n in estimates else "")
                          for n, (a, r) in peaks.peaks.items())
    t = video.timings
    emit("hy15_plan", f"| {recipe.name} | {wall:.1f} | {t.encode:.2f} | {sum(t.steps):.1f} ({len(t.steps)} steps) | "
                      f"{gib(allocated)} | {gib(plan.memory.peak_bytes)} | {per_stage} |",
         {"recipe": recipe.name, "wall_s": wall, "encode_s": t.encode, "steps": t.steps, "decode_s": t.decode,
          "peak_allocated": allocated, "plan_peak": plan.memory.peak_bytes,
          "measured": {n: list(v) for n, v in peaks.peaks.items()}, "first_video": True})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("wan", "hy15_text", "hy15_plan"), nargs="+", default=["wan", "hy15_text"],
                        help="hy15_plan (not in the default): the whole 24 GiB HunyuanVideo-1.5 plan, in its own call")
    parser.add_argument("--root", type=Path, default=Path("/tmp/hy15"), help="hy15_plan: where its files go")
    parser.add_argument("--budget-s", type=float, default=560.0, help="stop starting rows after this many seconds")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same logic at tiny sizes on the CPU")
    args = parser.parse_args(argv)
    STATE.update(smoke=args.cpu_smoke, device="cpu" if args.cpu_smoke else "cuda",
                 deadline=time.monotonic() + args.budget_s)
    if "wan" in args.part:
        part_wan()
    if "hy15_text" in args.part:
        part_hy15_text()
    if "hy15_plan" in args.part:
        part_hy15_plan(args.root)
    print((out_dir() / "encoder_streaming.md").read_text())


if __name__ == "__main__":
    main()
