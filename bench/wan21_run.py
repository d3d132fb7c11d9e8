"""A short run of a full-size Wan2.1-1.3B plan on the GPU, through the compiler and the runtime.

Random weights of the real shapes are generated on the GPU and written in Wan's
layout (DiT 1.42B, VAE, umT5-XXL 5.7B: ~14 GB), a recipe pointing at them is
compiled for this machine (`target.device = "auto"`), and the plan runs 4 UniPC
steps at 480p x 81 frames through `telefuser.load_plan(...).run(...)`; the stage
summary `telefuser-run` prints is printed. The tokenizer is the project's tiny one
(umT5's 256k-entry tokenizer.json cannot be fetched here; token ids are valid
either way). Run on the device: `PYTHONPATH=. python3 bench/wan21_run.py`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import compile_shipped, environment, out_dir, target_overrides
from bench.weights_random import meta_model, random_state
from telefuser.models.t5.tokenizer import build_tiny_tokenizer
from telefuser.models.t5.umt5 import UMT5_XXL, UMT5Encoder
from telefuser.models.wan.dit import WAN21_1_3B, WanDiT
from telefuser.models.wan.vae import WanVAE, WanVAEConfig

ROOT = Path(os.environ.get("WAN_RANDOM_ROOT", "/tmp/wan21_random"))


def write_files(root: Path) -> dict[str, Path]:
    """Random Wan2.1-1.3B weights of the real shapes in Wan's layout and the tiny tokenizer under `root`; the path
    of each of the shipped recipe's models."""
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for build, name in ((lambda: WanDiT(WAN21_1_3B), "diffusion_pytorch_model.safetensors"),
                        (lambda: WanVAE(WanVAEConfig()), "Wan2.1_VAE.safetensors"),
                        (lambda: UMT5Encoder(UMT5_XXL), "models_t5_umt5-xxl-enc-bf16.safetensors")):
        state = random_state(meta_model(build), "cuda")
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, root / name)
        del state
        torch.cuda.empty_cache()
    build_tiny_tokenizer(root / "tokenizer.json")
    print(f"random weights written in {time.perf_counter() - start:.0f} s")
    return {"dit": root / "diffusion_pytorch_model.safetensors", "vae": root / "Wan2.1_VAE.safetensors",
            "text_encoder": root / "models_t5_umt5-xxl-enc-bf16.safetensors", "tokenizer": root / "tokenizer.json"}


def main() -> None:
    import telefuser

    paths = write_files(ROOT)
    # the shipped recipe on these files: 480p, 81 frames, 4 steps
    plan = compile_shipped("wan21_t2v_1.3b", ROOT / "plan.json", paths,
                           [*target_overrides(False), "layer2.num_inference_steps=4"], explain=True)
    pipe = telefuser.load_plan(str(plan))
    video = pipe.run(prompt="a red fox running through fresh snow", seed=7, progress=False)
    summary = video.timings.summary()
    lines = [f"Measured: {environment()}.", "",
             f"`telefuser.load_plan(plan).run(...)` of a compiled Wan2.1-1.3B plan (random weights, bf16, 480p 16:9, "
             f"81 frames, 4 UniPC steps, CFG 5.0): frames {tuple(video.frames.shape)} uint8.", "", "```", summary, "```"]
    (out_dir() / "wan21_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
