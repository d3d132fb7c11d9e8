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

from bench.common import environment, out_dir
from telefuser.models.t5.tokenizer import build_tiny_tokenizer
from telefuser.models.t5.umt5 import UMT5_XXL, UMT5Encoder
from telefuser.models.wan.dit import WAN21_1_3B, WanDiT
from telefuser.models.wan.vae import WanVAE, WanVAEConfig

ROOT = Path(os.environ.get("WAN_RANDOM_ROOT", "/tmp/wan21_random"))
RECIPE = """\
name = "wan21_t2v_1.3b_random"
[target]
device = "auto"
[layer1]
torch_dtype = "bfloat16"
[[layer1.models]]
name = "dit"
role = "dit"
path = "{root}/diffusion_pytorch_model.safetensors"
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
num_inference_steps = 4
num_frames = 81
[layer3.resolution]
default = "480p"
choices = ["480p"]
"""


def write_random(model: torch.nn.Module, path: Path) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name or name.endswith("gamma") else p.normal_(0, 0.02)
    save_file({k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, path)


def main() -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for build, name in ((lambda: WanDiT(WAN21_1_3B), "diffusion_pytorch_model.safetensors"),
                        (lambda: WanVAE(WanVAEConfig()), "Wan2.1_VAE.safetensors"),
                        (lambda: UMT5Encoder(UMT5_XXL), "models_t5_umt5-xxl-enc-bf16.safetensors")):
        with torch.device("cuda"):
            model = build().to(torch.bfloat16)
        write_random(model, ROOT / name)
        del model
        torch.cuda.empty_cache()
    build_tiny_tokenizer(ROOT / "tokenizer.json")
    recipe = ROOT / "recipe.toml"
    recipe.write_text(RECIPE.format(root=ROOT))
    print(f"random weights written in {time.perf_counter() - start:.0f} s")

    from telefuser.cli.compile import main as compile_main
    import telefuser

    plan = ROOT / "plan.json"
    assert compile_main([str(recipe), "-o", str(plan)]) == 0
    assert compile_main(["--explain", str(plan)]) == 0
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
