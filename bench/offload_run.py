"""Offload cost on the GPU (issue 13): a full-size Wan2.1 plan with umT5-XXL MODEL_CPU_OFFLOAD, through the runtime,
beside diffusers' WanPipeline (no offload) on the same files in the same call.

Random bf16 weights of the real shapes (DiT 14B, or 1.3B with WAN_OFFLOAD_DIT=1.3b; umT5-XXL 5.7B; the Wan2.1 VAE)
are written once under $WAN_RANDOM_ROOT (default /tmp/wan21_offload; ~41 GB for 14B) in diffusers' / transformers'
folder layouts (bench/weights_random.py); our compiler reads those layouts, so both sides load the same files,
from a warm page cache. 480p 16:9, 81 frames, 2 UniPC steps, CFG 5.0, in this order:

1. loading: `telefuser.load_plan` of the `offload` plan (text encoder MODEL_CPU_OFFLOAD, as
   recipes/wan21_t2v_14b.toml ships), then diffusers' / transformers' `from_pretrained(..., device_map="cuda")`
   of the same DiT, VAE and umT5 encoder (the text encoder of theirs stays on the GPU: no offload);
2. runs: ours 3 videos (the first right after loading: its encode stage includes the first copy in of the
   text encoder and the Triton JIT), then diffusers' WanPipeline 2 videos (the first warms up);
3. `offload+vae`: the VAE offloaded too, so the plan records a prefetch of the VAE during the denoise stage.

Issue 13's reference, same weights: 23.0 s per video with the text-encode stage at 10.3 s (pageable copy in,
copy back), diffusers 17.3 s, loading 9.6 s against 6.8 s (H100, 2026-11-23).
GPU: `PYTHONPATH=. python3 bench/offload_run.py`; writes $OUT/offload_run.md.
CPU check of the logic at tiny sizes: `python bench/offload_run.py --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from bench import weights_random
from bench.common import compile_shipped, free, offload_overrides, size_overrides, sync, target_overrides
from bench.weights_random import write_wan21_diffusers

BF16 = torch.bfloat16
PROMPT = "a red fox running through fresh snow"


class Setup:
    def __init__(self, smoke: bool, size: str) -> None:
        from telefuser.models.t5.umt5 import UMT5_XXL, UMT5Config
        from telefuser.models.wan.dit import WAN21_1_3B, WAN21_14B, WanDiTConfig
        from telefuser.models.wan.vae import WanVAEConfig

        self.smoke, self.size = smoke, size
        self.device = "cpu" if smoke else "cuda"
        self.root = Path(os.environ.get("WAN_RANDOM_ROOT", "/tmp/wan21_offload")) / (size + ("_smoke" if smoke else ""))
        if smoke:
            from telefuser.models.tiny import TINY_ARCH

            self.dit, self.vae = WanDiTConfig(**TINY_ARCH["dit"]), WanVAEConfig(**TINY_ARCH["vae"])
            from tokenizers import Tokenizer

            from telefuser.models.t5.tokenizer import build_tiny_tokenizer

            self.root.mkdir(parents=True, exist_ok=True)
            vocab = Tokenizer.from_file(str(build_tiny_tokenizer(self.root / "tokenizer.json"))).get_vocab_size()
            self.t5 = UMT5Config(**dict(TINY_ARCH["text_encoder"], vocab_size=vocab))
            self.res, self.frames, self.text_len, self.size_hw = "144p", 9, 64, (144, 256)
            weights_random.SHARD_BYTES = 1 << 16  # shards and index files, as at full size
        else:
            self.dit, self.vae, self.t5 = (WAN21_14B if size == "14b" else WAN21_1_3B), WanVAEConfig(), UMT5_XXL
            self.res, self.frames, self.text_len, self.size_hw = "480p", 81, 512, (480, 832)


def warm_page_cache(root: Path) -> float:
    total = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return total / 1e9


def compile_plan(setup: Setup, paths: dict[str, Path], label: str, offloaded: list[str]) -> Path:
    """The shipped Wan2.1 recipe of the setup's size, on these files, 2 steps, MODEL_CPU_OFFLOAD for `offloaded` and
    no offload for the rest."""
    modes = {name: {"offload_type": "MODEL_CPU_OFFLOAD" if name in offloaded else "NO_CPU_OFFLOAD"}
             for name in ("dit", "vae", "text_encoder")}
    overrides = [*target_overrides(setup.smoke), f"layer1.models.dit.arch={{num_heads={setup.dit.num_heads}}}",
                 *size_overrides(setup.frames, setup.text_len, setup.res, steps=2), "layer2.sigma_shift=5.0",
                 *offload_overrides(modes)]
    recipe = "wan21_t2v_14b" if setup.size == "14b" else "wan21_t2v_1.3b"
    return compile_shipped(recipe, setup.root / f"{label.replace('+', '_')}.plan.json", paths, overrides, explain=True)


def run_ours(setup: Setup, plan: Path, label: str, offloaded: list[str]) -> tuple[list[str], float]:
    import telefuser

    sync()
    start = time.perf_counter()
    pipe = telefuser.load_plan(str(plan))
    sync()
    load = time.perf_counter() - start
    rows = []
    for index in range(3):
        sync()
        start = time.perf_counter()
        video = pipe.run(prompt=PROMPT, seed=7, progress=False)
        whole = time.perf_counter() - start
        t = video.timings
        rows.append(f"| TeleFuser {label} | {index + 1}{' (first after loading)' if index == 0 else ''} | "
                    f"{t.encode:.2f} | {sum(t.steps):.2f} | {t.decode:.2f} | {whole:.2f} | "
                    f"{t.peak_memory_bytes / 2**30:.1f} |")
    for name in offloaded:
        w = pipe.placements[name].weights
        rows.append(f"| TeleFuser {label} | {name}: pinned {w.pinned}, {len(w.chunks)} host chunks, "
                    f"{w.nbytes / 1e9:.2f} GB, {w.copies_in} copies in | | | | | |")
    rows.append(f"| TeleFuser {label} | load_plan {load:.2f} s; estimated peak "
                f"{pipe.plan.memory.peak_bytes / 2**30:.1f} GiB; prefetches started {pipe.prefetch.started} | | | | | |")
    del pipe, video
    free()
    return rows, load


def load_diffusers(setup: Setup, paths: dict[str, Path]):
    """(WanPipeline on the device, seconds of from_pretrained for the three models + tokenizer + pipeline)."""
    import transformers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    device_map = {"device_map": setup.device} if not setup.smoke else {}
    sync()
    start = time.perf_counter()
    transformer = WanTransformer3DModel.from_pretrained(paths["dit"].parent, torch_dtype=BF16, **device_map)
    vae = AutoencoderKLWan.from_pretrained(paths["vae"].parent, torch_dtype=BF16, **device_map)
    encoder = UMT5EncoderModel.from_pretrained(paths["text_encoder"].parent, **{dtype_kw: BF16}, **device_map)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(paths["tokenizer"]), pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=5.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder.eval(), vae=vae.eval(), scheduler=scheduler,
                       transformer=transformer.eval()).to(setup.device)
    sync()
    return pipe, time.perf_counter() - start


def run_diffusers(setup: Setup, pipe) -> list[str]:
    rows = []
    height, width = setup.size_hw
    for index in range(2):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=PROMPT, negative_prompt="", height=height, width=width, num_frames=setup.frames,
                 num_inference_steps=2, guidance_scale=5.0, max_sequence_length=setup.text_len,
                 generator=torch.Generator(setup.device).manual_seed(7), output_type="np")
        sync()
        whole = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        rows.append(f"| diffusers WanPipeline, no offload | {index + 1} | | | | {whole:.2f} | {peak:.1f} |")
    return rows


def pinning(setup: Setup, gb: float) -> str:
    """Seconds to pack a `gb` GB model into host chunks (pinned on CUDA): the page locking that loading pays."""
    from telefuser.runtime.memory.offload import OffloadedWeights

    numel = int(gb * 1e9) // 2 // 64
    module = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(numel, dtype=BF16), requires_grad=False)
                                     for _ in range(64)])
    start = time.perf_counter()
    weights = OffloadedWeights(module, torch.device(setup.device))
    return (f"packing {gb:.2f} GB into host chunks (pinned {weights.pinned}, {len(weights.chunks)} chunks) took "
            f"{time.perf_counter() - start:.2f} s")


def fresh_process(plan: Path) -> str:
    """Load + one video in a new process (Triton's kernel cache on disk is warm by now, as on a serving host)."""
    import subprocess
    import sys

    code = ("import time, torch, telefuser; s = time.perf_counter(); p = telefuser.load_plan(%r); "
            "torch.cuda.synchronize() if torch.cuda.is_available() else None; l = time.perf_counter() - s; "
            "v = p.run(prompt='a red fox running through fresh snow', seed=7, progress=False); "
            "print(f'RESULT load_plan {l:.2f} s, first video: encode {v.timings.encode:.2f} s, "
            "run {v.timings.encode + sum(v.timings.steps) + v.timings.decode:.2f} s')" % str(plan))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    found = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    return found[0][7:] if found else f"failed: {out.stderr[-500:]}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (checks the logic)")
    args = parser.parse_args(argv)
    setup = Setup(args.cpu_smoke, os.environ.get("WAN_OFFLOAD_DIT", "14b").lower())
    from bench.common import out_dir

    if not setup.smoke:
        from bench.common import environment

        env = environment()
    else:
        env = f"CPU smoke run, PyTorch {torch.__version__}"
    start = time.perf_counter()
    paths = write_wan21_diffusers(setup.root, setup.dit, setup.vae, setup.t5, setup.device)
    written = time.perf_counter() - start
    gb = warm_page_cache(setup.root)
    plans = {label: compile_plan(setup, paths, label, offloaded)
             for label, offloaded in (("offload", ["text_encoder"]), ("offload+vae", ["text_encoder", "vae"]))}
    lines = [f"Measured: {env}.", "",
             f"Wan2.1 DiT {setup.size}, umT5-XXL, VAE (random bf16 weights, {gb:.1f} GB in diffusers' layouts, written "
             f"in {written:.0f} s, read once before timing), {setup.res}, {setup.frames} frames, 2 UniPC steps, CFG 5.0.",
             "", "| pipeline | video | encode s | denoise s | decode s | run s | peak GiB |", "|---|---|---|---|---|---|---|"]
    rows, ours_load = run_ours(setup, plans["offload"], "offload", ["text_encoder"])
    lines += rows
    pipe, theirs_load = load_diffusers(setup, paths)
    lines += run_diffusers(setup, pipe)
    del pipe
    free()
    rows, _ = run_ours(setup, plans["offload+vae"], "offload+vae", ["text_encoder", "vae"])
    lines += rows
    lines += ["", f"Loading: TeleFuser load_plan {ours_load:.2f} s (text encoder into pinned host memory, DiT and VAE "
              f"to the GPU); diffusers/transformers from_pretrained(device_map) of the same three models + tokenizer "
              f"+ WanPipeline {theirs_load:.2f} s (everything on the GPU)."]
    lines += ["", f"Fresh process, offload plan (warm Triton cache on disk): {fresh_process(plans['offload'])}.",
              "", f"Host memory: {pinning(setup, 0.01 if setup.smoke else 11.36)}."]
    (out_dir() / "offload_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
