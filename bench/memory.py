"""Memory modes on one GPU (issue 10): step time and measured peak per offload mode, beside the plan's estimate
and beside diffusers' offloading, same weights, same call.

Random weights of the real shapes are written once under $WAN_MEMORY_ROOT (default /tmp/wan_memory) by
bench/weights_random.py: the Wan2.1-14B DiT (bf16), the Wan2.1 VAE and umT5-XXL in diffusers' / transformers'
folder layouts (our compiler reads those too, so both sides load the same files), and DiTs in the "scaled fp8"
layout published for Wan (block linears float8_e4m3fn + per-tensor `scale_weight`, Wan's key names).

MEMORY_PART=wan21 (default): Wan2.1-14B, 480p 16:9, 81 frames, 2 UniPC steps, CFG 5.0, the text encoder
MODEL_CPU_OFFLOAD in every plan (as recipes/wan21_t2v_14b.toml ships). The DiT resident, MODEL_CPU_OFFLOAD (with
the plan's prefetches, and with prefetch_size 0: one model on the device at a time, as diffusers' hooks keep it),
SEQUENTIAL_CPU_OFFLOAD, ASYNC_CPU_OFFLOAD, the FP8 checkpoint resident and FP8 + async; then diffusers'
WanPipeline resident, with `enable_model_cpu_offload()`, and with block-level group offloading of the
transformer (`apply_group_offloading(..., "block_level", num_blocks_per_group=1, use_stream=True)`).
MEMORY_PART=wan22: Wan2.2 T2V A14B with both experts FP8, 480p 81f, 4 UniPC steps (shift 12, boundary 0.875: 3
high-noise steps, 1 low-noise), experts resident, MODEL_CPU_OFFLOAD, SEQUENTIAL_ and ASYNC_CPU_OFFLOAD; then diffusers'
WanPipeline with two bf16 experts (transformer, transformer_2, boundary_ratio 0.875) resident, with model CPU offload
and with group offloading. diffusers reads no FP8 checkpoint, and two bf16 expert files (57 GB) beside the FP8 ones
do not fit the device's 64 GiB disk, so its experts are built in memory with random weights (one run each: no JIT).

Per row: seconds per step (the mean of the run's steps; the first plan runs twice so Triton's JIT compilation is
not counted), each stage's peak (max_memory_allocated / max_memory_reserved, reset as each stage starts), the
plan's estimated peak, and measured / estimate. A plan this TeleFuser refuses is reported with its message.
Writes $OUT/memory_<part>.md. GPU: `PYTHONPATH=. python3 bench/memory.py` (then MEMORY_PART=wan22); CPU check of
the logic at tiny sizes: `PYTHONPATH=. python3 bench/memory.py --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from bench import weights_random
from bench.common import compile_shipped, free, offload_overrides, size_overrides, sync, target_overrides
from bench.weights_random import write_fp8_scaled, write_wan21_diffusers

BF16 = torch.bfloat16
PROMPT = "a red fox running through fresh snow"
RAW: list[dict] = []  # every TeleFuser row's numbers, written beside the table as JSON
def offload(mode: str, prefetch: bool = True) -> dict[str, object]:
    """A model's offload_config keys; without `prefetch`, nothing is copied in ahead of its use."""
    return {"offload_type": mode, **({} if prefetch else {"prefetch_size": 0})}


class Setup:
    def __init__(self, smoke: bool, part: str) -> None:
        from telefuser.models.t5.umt5 import UMT5_XXL, UMT5Config
        from telefuser.models.wan.dit import WAN21_14B, WanDiTConfig
        from telefuser.models.wan.vae import WanVAEConfig

        self.smoke, self.part = smoke, part
        self.device = "cpu" if smoke else "cuda"
        self.root = Path(os.environ.get("WAN_MEMORY_ROOT", "/tmp/wan_memory") + ("_smoke" if smoke else ""))
        if smoke:
            from tokenizers import Tokenizer

            from telefuser.models.t5.tokenizer import build_tiny_tokenizer
            from telefuser.models.tiny import TINY_ARCH

            self.dit, self.vae = WanDiTConfig(**TINY_ARCH["dit"]), WanVAEConfig(**TINY_ARCH["vae"])
            (self.root / "base").mkdir(parents=True, exist_ok=True)
            vocab = Tokenizer.from_file(str(build_tiny_tokenizer(self.root / "base" / "tokenizer.json"))).get_vocab_size()
            self.t5 = UMT5Config(**dict(TINY_ARCH["text_encoder"], vocab_size=vocab))
            self.res, self.frames, self.text_len, self.size_hw = "144p", 9, 64, (144, 256)
            weights_random.SHARD_BYTES = 1 << 16  # shards and index files, as at full size
        else:
            self.dit, self.vae, self.t5 = WAN21_14B, WanVAEConfig(), UMT5_XXL
            self.res, self.frames, self.text_len, self.size_hw = "480p", 81, 512, (480, 832)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


class StagePeaks:
    """Each stage's peak: the runtime's stage functions wrapped for the duration of a run (measurement only)."""

    def __init__(self) -> None:
        self.peaks: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> "StagePeaks":
        from telefuser.runtime import stages

        self.saved = dict(stages.STAGES)

        def wrap(fn):
            def run(pipe, state, stage):
                if torch.cuda.is_available():
                    sync()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    return fn(pipe, state, stage)
                finally:
                    if torch.cuda.is_available():
                        sync()
                        self.peaks[stage.name] = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            return run

        for kind, fn in self.saved.items():
            stages.STAGES[kind] = wrap(fn)
        return self

    def __exit__(self, *exc) -> None:
        from telefuser.runtime import stages

        stages.STAGES.clear()
        stages.STAGES.update(self.saved)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


def recipe(setup: Setup, paths: dict[str, Path], label: str, dits: list[tuple[str, str, Path]],
           modes: dict[str, dict], steps: int, moe: bool) -> tuple[str, list[str]]:
    """The shipped recipe (Wan2.1-14B, or Wan2.2 T2V A14B for `moe`) and its `--set`s: these files, this size,
    `modes` (model name -> `offload(...)`); the text encoder is MODEL_CPU_OFFLOAD unless given."""
    modes = {"text_encoder": offload("MODEL_CPU_OFFLOAD"), **modes}
    sets = [f"layer1.models.{name}.path={path}" for name, _, path in dits]
    sets += [f"layer1.models.{name}.path={path}" for name, path in paths.items() if name != "dit"]
    sets += [f"layer1.models.{name}.arch={{num_heads={setup.dit.num_heads}}}" for name, _, _ in dits]
    sets += [*target_overrides(setup.smoke), *size_overrides(setup.frames, setup.text_len, setup.res, steps),
             *offload_overrides(modes)]
    return ("wan22_t2v_a14b" if moe else "wan21_t2v_14b"), sets


def run_plan(setup: Setup, label: str, spec: tuple[str, list[str]], repeat: int = 1) -> list[str]:
    """Compile `spec` (a shipped recipe and its `--set`s), load, run `repeat` videos (the last one is reported); a
    refusal becomes the row."""
    import telefuser
    from telefuser.errors import TeleFuserError

    try:
        plan_path = compile_shipped(spec[0], setup.root / f"{_slug(label)}.plan.json", {}, spec[1])
        pipe = telefuser.load_plan(str(plan_path))
        plan = pipe.plan
    except TeleFuserError as exc:
        return [f"| {label} | refused: {str(exc)[:300]} | | | | | |"]
    try:
        for _ in range(repeat):
            with StagePeaks() as peaks:
                start = time.perf_counter()
                video = pipe.run(prompt=PROMPT, seed=7, progress=False)
                whole = time.perf_counter() - start
    except TeleFuserError as exc:
        return [f"| {label} | failed: {str(exc)[:300]} | | | | | |"]
    est = plan.memory.peak_bytes
    steps = video.timings.steps
    allocated = max((a for a, _ in peaks.peaks.values()), default=video.timings.peak_memory_bytes)
    reserved = max((r for _, r in peaks.peaks.values()), default=0)
    estimates = {s.stage: s.peak_bytes for s in plan.memory.stages}
    # per stage: measured allocated / reserved against the plan's estimate of that stage
    per_stage = ", ".join(
        f"{name} {gib(a)}/{gib(r)} est {gib(estimates[name])}" if name in estimates else f"{name} {gib(a)}/{gib(r)}"
        for name, (a, r) in peaks.peaks.items())
    denoise = next((a for name, (a, _) in peaks.peaks.items() if "denoise" in name), 0)
    ratio = f"{allocated / est:.2f} / {reserved / est:.2f}" if est else "-"
    RAW.append({"label": label, "s_per_step": sum(steps) / len(steps), "steps": list(steps),
                "measured": {name: {"allocated": a, "reserved": r} for name, (a, r) in peaks.peaks.items()},
                "estimate": {s.stage: {"peak": s.peak_bytes, "components": s.components} for s in plan.memory.stages},
                "plan_peak": est, "breakdown": plan.memory.breakdown, "whole_run_s": whole})
    rows = [f"| {label} | {sum(steps) / len(steps):.2f} | {gib(denoise)} | {gib(allocated)} / {gib(reserved)} | "
            f"{gib(est)} | {ratio} | whole run {whole:.1f} s; {per_stage} |"]
    del pipe, video
    free()
    return rows


def random_transformer(setup: Setup, device: str):
    """diffusers' WanTransformer3DModel of the setup's DiT with random bf16 weights made on `device` (Wan2.2's two
    bf16 experts are built in memory: beside the FP8 files they do not fit the device's 64 GiB disk)."""
    from bench.weights_random import diffusers_transformer, random_value

    model = diffusers_transformer(setup.dit).to(BF16)  # on meta: free; the weights are made at bf16 size
    for name, module in model.named_modules():  # as from_pretrained(torch_dtype=bf16) keeps them
        if any(keep in name.split(".") for keep in model._keep_in_fp32_modules or ()):
            module.float()
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(random_value(name, tensor.shape, tensor.dtype, device, gen))
    return model.eval()


def diffusers_rows(setup: Setup, paths: dict[str, Path], moe: bool = False) -> list[str]:
    """diffusers' WanPipeline on the same text encoder and VAE files: resident, model CPU offload, block-level group
    offload. Wan2.1: the same DiT files; Wan2.2 (`moe`): two bf16 experts built in memory, boundary 0.875, CFG 4/3."""
    import transformers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from diffusers.hooks import apply_group_offloading
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    steps_run = 4 if moe else 2
    rows = []
    for mode in ("resident", "enable_model_cpu_offload", "group offload (block_level, 1 block, use_stream)"):
        # resident experts are made on the GPU; offloaded ones start in host memory, as from_pretrained leaves them
        where = setup.device if setup.smoke or mode == "resident" else "cpu"
        if moe:
            experts = {"transformer": random_transformer(setup, setup.device).to(where),
                       "transformer_2": random_transformer(setup, setup.device).to(where), "boundary_ratio": 0.875}
        else:
            experts = {"transformer": WanTransformer3DModel.from_pretrained(paths["dit"].parent,
                                                                            torch_dtype=BF16).eval()}
        free()
        pipe = WanPipeline(
            tokenizer=PreTrainedTokenizerFast(tokenizer_file=str(paths["tokenizer"]), pad_token="<pad>",
                                              eos_token="</s>", unk_token="<unk>"),
            text_encoder=UMT5EncoderModel.from_pretrained(paths["text_encoder"].parent, **{dtype_kw: BF16}).eval(),
            vae=AutoencoderKLWan.from_pretrained(paths["vae"].parent, torch_dtype=BF16).eval(),
            scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              num_train_timesteps=1000, flow_shift=12.0 if moe else 5.0),
            **experts)
        if setup.smoke or mode == "resident":
            pipe.to(setup.device)
        elif mode == "enable_model_cpu_offload":
            pipe.enable_model_cpu_offload()
        else:
            for transformer in (pipe.transformer, pipe.transformer_2):
                if transformer is not None:
                    apply_group_offloading(transformer, onload_device=torch.device("cuda"),
                                           offload_type="block_level", num_blocks_per_group=1, use_stream=True)
            pipe.text_encoder.to("cuda")
            pipe.vae.to("cuda")
        steps: list[float] = []

        def step_end(_pipe, _i, _t, kwargs):
            sync()
            steps.append(time.perf_counter())
            return kwargs

        height, width = setup.size_hw
        guidance = {"guidance_scale": 4.0, "guidance_scale_2": 3.0} if moe else {"guidance_scale": 5.0}
        for _ in range(1 if setup.smoke or moe else 2):  # Wan2.1: the first warms up
            steps.clear()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                pipe(prompt=PROMPT, negative_prompt="", height=height, width=width, num_frames=setup.frames,
                     num_inference_steps=steps_run, max_sequence_length=setup.text_len,
                     generator=torch.Generator(setup.device).manual_seed(7), output_type="np",
                     callback_on_step_end=step_end, **guidance)
            sync()
        # the first step's time starts after text encoding: measured from the second step on
        per_step = (steps[-1] - steps[0]) / max(1, len(steps) - 1)
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0
        rows.append(f"| diffusers {mode} | {per_step:.2f} | | {gib(peak)} / {gib(reserved)} | | | whole run "
                    f"{time.perf_counter() - start:.1f} s |")
        del pipe, experts
        free()
    return rows


def part_wan21(setup: Setup) -> list[str]:
    """MEMORY_ROWS (labels separated by ";") limits the TeleFuser rows; MEMORY_PEERS=0 leaves out diffusers."""
    paths = write_wan21_diffusers(setup.root / "base", setup.dit, setup.vae, setup.t5, setup.device)
    rows_wanted = [r for r in os.environ.get("MEMORY_ROWS", "").split(";") if r]  # "none": only the peers
    no_prefetch = {"text_encoder": offload("MODEL_CPU_OFFLOAD", prefetch=False),
                   "dit": offload("MODEL_CPU_OFFLOAD", prefetch=False)}  # one model at a time, as diffusers' hooks
    configs = [(label, modes) for label, modes in (
        ("bf16 resident", {"dit": offload("NO_CPU_OFFLOAD")}),
        ("bf16 MODEL_CPU_OFFLOAD", {"dit": offload("MODEL_CPU_OFFLOAD")}),
        ("bf16 MODEL_CPU_OFFLOAD, prefetch_size 0", no_prefetch),
        ("bf16 SEQUENTIAL_CPU_OFFLOAD", {"dit": offload("SEQUENTIAL_CPU_OFFLOAD")}),
        ("bf16 ASYNC_CPU_OFFLOAD", {"dit": offload("ASYNC_CPU_OFFLOAD")}),
        ("fp8 resident", {"dit": offload("NO_CPU_OFFLOAD")}),
        ("fp8 ASYNC_CPU_OFFLOAD", {"dit": offload("ASYNC_CPU_OFFLOAD")})) if not rows_wanted or label in rows_wanted]
    fp8 = None
    if any(label.startswith("fp8") for label, _ in configs):
        fp8 = write_fp8_scaled(setup.dit, setup.root / "fp8" / "dit_fp8_e4m3fn_scaled.safetensors", setup.device)
    rows = []
    for label, modes in configs:
        path = fp8 if label.startswith("fp8") else paths["dit"]
        r = recipe(setup, paths, label, [("dit", "dit", path)], modes, steps=2, moe=False)
        rows += run_plan(setup, f"TeleFuser {label}", r, repeat=2 if not rows else 1)
    return rows + (diffusers_rows(setup, paths) if os.environ.get("MEMORY_PEERS", "1") != "0" else [])


def part_wan22(setup: Setup) -> list[str]:
    paths = write_wan21_diffusers(setup.root / "base22", None, setup.vae, setup.t5, setup.device)
    rows_wanted = [r for r in os.environ.get("MEMORY_ROWS", "").split(";") if r]  # "none": only the peers
    rows = []
    def both(mode: str, prefetch: bool = True) -> dict[str, str]:
        return {"dit_high": offload(mode, prefetch), "dit_low": offload(mode, prefetch)}

    one_at_a_time = {**both("MODEL_CPU_OFFLOAD", prefetch=False),
                     "text_encoder": offload("MODEL_CPU_OFFLOAD", prefetch=False)}  # as diffusers' hooks
    for label, modes in (("A14B fp8 experts resident", both("NO_CPU_OFFLOAD")),
                         ("A14B fp8 MODEL_CPU_OFFLOAD", both("MODEL_CPU_OFFLOAD")),
                         ("A14B fp8 MODEL_CPU_OFFLOAD, prefetch_size 0", one_at_a_time),
                         ("A14B fp8 SEQUENTIAL_CPU_OFFLOAD", both("SEQUENTIAL_CPU_OFFLOAD")),
                         ("A14B fp8 ASYNC_CPU_OFFLOAD", both("ASYNC_CPU_OFFLOAD"))):
        if rows_wanted and label not in rows_wanted:
            continue
        experts = [(name, role, write_fp8_scaled(setup.dit, setup.root / name / f"{name}_fp8_e4m3fn_scaled.safetensors",
                                                setup.device))
                   for name, role in (("dit_high", "dit_high_noise"), ("dit_low", "dit_low_noise"))]
        r = recipe(setup, paths, label, experts, modes, steps=4, moe=True)
        rows += run_plan(setup, f"TeleFuser {label}", r, repeat=2 if not rows else 1)
    return rows + (diffusers_rows(setup, paths, moe=True) if os.environ.get("MEMORY_PEERS", "1") != "0" else [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (checks the logic)")
    args = parser.parse_args(argv)
    part = os.environ.get("MEMORY_PART", "wan21")
    setup = Setup(args.cpu_smoke, part)
    if setup.smoke:
        env = f"CPU smoke run, PyTorch {torch.__version__}"
    else:
        from bench.common import environment

        env = environment()
        # the other part's files do not fit beside this part's on a 64 GiB disk
        for other in (["base22", "dit_high", "dit_low"] if part == "wan21" else ["base", "fp8"]):
            shutil.rmtree(setup.root / other, ignore_errors=True)
    start = time.perf_counter()
    rows = part_wan21(setup) if part == "wan21" else part_wan22(setup)
    from bench.common import out_dir

    lines = [f"Measured: {env}; random weights, {setup.res}, {setup.frames} frames; whole script "
             f"{time.perf_counter() - start:.0f} s.", "",
             "| configuration | s / step | denoise peak GiB | run peak allocated / reserved GiB | plan estimate GiB | "
             "allocated / reserved over estimate | per stage: allocated/reserved, estimate GiB |", "|---|---|---|---|---|---|---|", *rows]
    (out_dir() / f"memory_{part}.md").write_text("\n".join(lines) + "\n")
    (out_dir() / f"memory_{part}.json").write_text(json.dumps({"environment": env, "rows": RAW}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
