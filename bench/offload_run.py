"""Offload cost on the GPU: a full-size Wan2.1 plan with umT5-XXL MODEL_CPU_OFFLOAD, per video, through the runtime.

Random bf16 weights of the real shapes (DiT 14B, or 1.3B with WAN_OFFLOAD_DIT=1.3b; umT5-XXL 5.7B; the VAE) are
written once under $WAN_RANDOM_ROOT (default /tmp/wan21_offload; the 14B set needs about 41 GB of disk), then two
plans are compiled for this machine, 480p 16:9, 81 frames, 2 UniPC steps:

- `offload`: the text encoder MODEL_CPU_OFFLOAD (pinned host copy, copied in per video, dropped after);
- `offload+vae`: the VAE offloaded too, so the plan records a prefetch of the VAE during the denoise stage.

Each plan runs 3 videos (the first warms up); the table gives the last two's encode / denoise / decode / whole-run
seconds and each offloaded model's copies and bytes. Issue 13's reference, same weights: 23.0 s per video with
the text-encode stage at 10.3 s (pageable copy in, copy back), diffusers 17.3 s (H100, 2026-11-23).
Run on the device: `PYTHONPATH=. python3 bench/offload_run.py`; writes $OUT/offload_run.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from bench.common import environment, out_dir
from bench.wan21_run import write_random
from telefuser.models.t5.tokenizer import build_tiny_tokenizer
from telefuser.models.t5.umt5 import UMT5_XXL, UMT5Encoder
from telefuser.models.wan.dit import WAN21_1_3B, WAN21_14B, WanDiT
from telefuser.models.wan.vae import WanVAE, WanVAEConfig

ROOT = Path(os.environ.get("WAN_RANDOM_ROOT", "/tmp/wan21_offload"))
SIZE = os.environ.get("WAN_OFFLOAD_DIT", "14b").lower()
RECIPE = """\
name = "wan21_offload_{label}"
[target]
device = "auto"
[layer1]
torch_dtype = "bfloat16"
[[layer1.models]]
name = "dit"
role = "dit"
path = "{root}/dit_{size}.safetensors"
arch = {{ num_heads = {heads} }}
[[layer1.models]]
name = "vae"
role = "vae"
path = "{root}/Wan2.1_VAE.safetensors"
[[layer1.models]]
name = "text_encoder"
role = "text_encoder"
path = "{root}/models_t5_umt5-xxl-enc-bf16.safetensors"
[[layer1.models]]
name = "tokenizer"
role = "tokenizer"
path = "{root}/tokenizer.json"
[layer2]
num_inference_steps = 2
num_frames = 81
{offload}
[layer3.resolution]
default = "480p"
choices = ["480p"]
"""
OFFLOAD = '[layer2.models.{name}]\noffload_config = {{ offload_type = "MODEL_CPU_OFFLOAD" }}\n'


def weights() -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    config = WAN21_14B if SIZE == "14b" else WAN21_1_3B
    for build, name in ((lambda: WanDiT(config), f"dit_{SIZE}.safetensors"),
                        (lambda: WanVAE(WanVAEConfig()), "Wan2.1_VAE.safetensors"),
                        (lambda: UMT5Encoder(UMT5_XXL), "models_t5_umt5-xxl-enc-bf16.safetensors")):
        if (ROOT / name).exists():
            continue
        with torch.device("cuda"):
            model = build().to(torch.bfloat16)
        write_random(model, ROOT / name)
        del model
        torch.cuda.empty_cache()
    if not (ROOT / "tokenizer.json").exists():
        build_tiny_tokenizer(ROOT / "tokenizer.json")


def run(label: str, offloaded: list[str]) -> list[str]:
    import telefuser
    from telefuser.cli.compile import main as compile_main

    recipe = ROOT / f"{label}.toml"
    recipe.write_text(RECIPE.format(label=label.replace("+", "_"), root=ROOT, size=SIZE,
                                    heads=40 if SIZE == "14b" else 12,
                                    offload="".join(OFFLOAD.format(name=n) for n in offloaded)))
    plan = ROOT / f"{label}.plan.json"
    assert compile_main([str(recipe), "-o", str(plan)]) == 0
    assert compile_main(["--explain", str(plan)]) == 0
    start = time.perf_counter()
    pipe = telefuser.load_plan(str(plan))
    load = time.perf_counter() - start
    rows = []
    for index in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        video = pipe.run(prompt="a red fox running through fresh snow", seed=7, progress=False)
        whole = time.perf_counter() - start
        t = video.timings
        if index:
            rows.append(f"| {label} | {index} | {t.encode:.2f} | {sum(t.steps):.2f} | {t.decode:.2f} | {whole:.2f} | "
                        f"{t.peak_memory_bytes / 2**30:.1f} |")
    for name in offloaded:
        w = pipe.placements[name].weights
        rows.append(f"| {label} | {name}: pinned {w.pinned}, {len(w.chunks)} host chunks, {w.nbytes / 1e9:.2f} GB, "
                    f"{w.copies_in} copies in | | | | | |")
    rows.append(f"| {label} | load_plan {load:.1f} s; prefetches started {pipe.prefetch.started} | | | | | |")
    del pipe
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    weights()
    lines = [f"Measured: {environment()}.", "",
             f"Wan2.1 DiT {SIZE}, umT5-XXL, VAE (random bf16 weights), 480p 16:9, 81 frames, 2 UniPC steps, CFG 5.0.",
             "", "| plan | video | encode s | denoise s | decode s | run s | peak GiB |", "|---|---|---|---|---|---|---|"]
    lines += run("offload", ["text_encoder"])
    lines += run("offload+vae", ["text_encoder", "vae"])
    (out_dir() / "offload_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
