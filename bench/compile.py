"""Compile-time benchmark (CPU): every shipped recipe against official-size weight indexes, and `--check`.

The official checkpoints are not on a CI machine, so this builds their indexes:
for each file of `${TELEFUSER_MODEL_ROOT}` the recipes name, a file with the
official tensor names, shapes and dtypes (taken from TeleFuser's own modules
built on the meta device) and the official size, but no data: safetensors
headers followed by a sparse hole, `.pth` zips whose tensors are 1-element
storages expanded to the full shape. The compiler reads exactly what it reads
from the real files (headers, pickles), so the times are those of a real
compile. In-process times exclude interpreter start; the `--check` figures are
whole commands, as CI sees them.
Run: `python bench/compile.py` (prints markdown).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.weights_random import meta_model
from telefuser.compiler import compile_recipe
from telefuser.errors import WeightsError
from telefuser.models.t5.umt5 import UMT5Config, UMT5Encoder
from telefuser.models.wan.dit import WanDiT, WanDiTConfig
from telefuser.models.wan.vae import WanVAE, WanVAEConfig
from telefuser.models.wan.vae22 import Wan22VAE, Wan22VAEConfig

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16"}
DIT_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
DIT_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
DIT_TI2V_5B = dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)

Shapes = dict[str, tuple[int, ...]]


def module_shapes(module_class, config) -> Shapes:
    return {k: tuple(v.shape) for k, v in meta_model(lambda: module_class(config)).state_dict().items()}


def clip_shapes() -> Shapes:
    """Wan's open-clip XLM-RoBERTa ViT-H/14 (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth), main tensors."""
    shapes: Shapes = {"visual.patch_embedding.weight": (1280, 3, 14, 14), "visual.cls_embedding": (1, 1, 1280),
                      "visual.pos_embedding": (1, 257, 1280), "visual.head": (1280, 1024),
                      "textual.token_embedding.weight": (250002, 1024), "log_scale": ()}
    for i in range(32):
        p = f"visual.transformer.{i}."
        shapes |= {p + "attn.to_qkv.weight": (3840, 1280), p + "attn.proj.weight": (1280, 1280),
                   p + "mlp.0.weight": (5120, 1280), p + "mlp.2.weight": (1280, 5120), p + "norm1.weight": (1280,)}
    for i in range(24):
        p = f"textual.blocks.{i}."
        shapes |= {p + "attn.q.weight": (1024, 1024), p + "attn.k.weight": (1024, 1024), p + "attn.v.weight": (1024, 1024),
                   p + "attn.o.weight": (1024, 1024), p + "ffn.0.weight": (4096, 1024), p + "ffn.2.weight": (1024, 4096)}
    return shapes


def write_safetensors_index_only(path: Path, shapes: Shapes, dtype: torch.dtype) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)  # sparse: the official size, no data on disk


def write_shards(folder: Path, shapes: Shapes, dtype: torch.dtype, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    weight_map = {}
    for i in range(count):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{count:05d}.safetensors"
        part = names[i::count]
        write_safetensors_index_only(folder / shard, {k: shapes[k] for k in part}, dtype)
        weight_map |= {k: shard for k in part}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def write_pth_index_only(path: Path, shapes: Shapes, dtype: torch.dtype) -> None:
    torch.save({k: torch.zeros((), dtype=dtype).expand(s) for k, s in shapes.items()}, path)


def write_vfi_root(root: Path) -> None:
    """RIFE v4.26's train_log/flownet.pkl (DDP names under module.) and madebyollin/taehv's taew2_1.pth and
    taehv1_5.pth (decoders only here), as the shipped recipes name them under ${TELEFUSER_MODEL_ROOT}."""
    from dataclasses import asdict

    from telefuser.models.rife.ifnet import IFNetConfig
    from telefuser.models.rife.keys import expected_shapes as rife_shapes
    from telefuser.models.taehv.decoder import TAEHVConfig
    from telefuser.models.taehv.keys import expected_shapes as taehv_shapes

    (root / "RIFEv4.26_0921" / "train_log").mkdir(parents=True)
    write_pth_index_only(root / "RIFEv4.26_0921" / "train_log" / "flownet.pkl",
                         {"module." + k: v for k, v in rife_shapes(asdict(IFNetConfig())).items()}, torch.float32)
    (root / "taehv").mkdir()
    write_pth_index_only(root / "taehv" / "taew2_1.pth", taehv_shapes(asdict(TAEHVConfig())), torch.float32)
    write_pth_index_only(root / "taehv" / "taehv1_5.pth",  # HunyuanVideo-1.5's: 32 latent channels, patch 2
                         taehv_shapes(asdict(TAEHVConfig(z_dim=32, patch_size=2))), torch.float32)


def build_model_root(root: Path) -> None:
    common = root / "_common"
    (common / "google" / "umt5-xxl").mkdir(parents=True)
    shutil.copy(RECIPES / "tiny" / "tokenizer.json", common / "google" / "umt5-xxl" / "tokenizer.json")
    write_pth_index_only(common / "Wan2.1_VAE.pth", module_shapes(WanVAE, WanVAEConfig()), torch.float32)
    write_pth_index_only(common / "models_t5_umt5-xxl-enc-bf16.pth", module_shapes(UMT5Encoder, UMT5Config()), torch.bfloat16)
    write_pth_index_only(common / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", clip_shapes(), torch.float16)
    t2v_14b = module_shapes(WanDiT, WanDiTConfig(**DIT_14B))
    for release in ("Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B", "Wan2.1-I2V-14B-480P", "Wan2.1-I2V-14B-720P", "Wan2.2-T2V-A14B",
                    "Wan2.2-T2V-A14B-Distill", "Wan2.2-I2V-A14B", "Wan2.2-TI2V-5B"):
        folder = root / release
        folder.mkdir()
        for item in common.iterdir():
            (folder / item.name).symlink_to(item)
    write_safetensors_index_only(root / "Wan2.1-T2V-1.3B" / "diffusion_pytorch_model.safetensors",
                                 module_shapes(WanDiT, WanDiTConfig(**DIT_1_3B)), torch.float32)
    write_shards(root / "Wan2.1-T2V-14B", t2v_14b, torch.float32, 6)
    for release in ("Wan2.1-I2V-14B-480P", "Wan2.1-I2V-14B-720P"):
        write_shards(root / release, module_shapes(WanDiT, WanDiTConfig(model_type="i2v", in_dim=36, **DIT_14B)),
                     torch.float32, 7)
    for release in ("Wan2.2-T2V-A14B", "Wan2.2-T2V-A14B-Distill"):
        for expert in ("high_noise_model", "low_noise_model"):
            write_shards(root / release / expert, t2v_14b, torch.bfloat16, 6)
    for expert in ("high_noise_model", "low_noise_model"):  # Wan2.2 I2V: 36 channels in, no img_emb (no CLIP)
        write_shards(root / "Wan2.2-I2V-A14B" / expert, module_shapes(WanDiT, WanDiTConfig(in_dim=36, **DIT_14B)),
                     torch.bfloat16, 6)
    write_shards(root / "Wan2.2-TI2V-5B", module_shapes(WanDiT, WanDiTConfig(**DIT_TI2V_5B)), torch.bfloat16, 3)
    write_pth_index_only(root / "Wan2.2-TI2V-5B" / "Wan2.2_VAE.pth", module_shapes(Wan22VAE, Wan22VAEConfig()),
                         torch.float32)
    write_vfi_root(root)

    from bench.hy15_files import write_hunyuan15_root

    write_hunyuan15_root(root)  # tencent/HunyuanVideo-1.5's files, headers only


def median_seconds(fn, runs: int = 7) -> float:
    fn()  # warm: imports and the page cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def whole_command(*args: str) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "telefuser.cli.compile", *args], capture_output=True, cwd=REPO)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model_root(root)
        os.environ["TELEFUSER_MODEL_ROOT"] = str(root)
        rows = []
        for path in sorted(RECIPES.glob("*.toml")):
            try:
                plan = compile_recipe(path)
            except WeightsError as exc:  # a file build_model_root does not make yet (LoRAs, FP8 checkpoints)
                rows.append(f"| {path.name} | skipped: {str(exc).split(';')[0]} | | | | |")
                continue
            seconds = median_seconds(lambda: compile_recipe(path))
            no_weights = median_seconds(lambda: compile_recipe(path, inspect_weights=False))
            files = sum(len(m.files) for m in plan.layer1_model_definition.models)
            params = sum(m.parameter_count for m in plan.layer1_model_definition.models)
            rows.append(f"| {path.name} | {files} | {params / 1e9:.2f} B | {seconds * 1e3:.1f} | {no_weights * 1e3:.1f} | "
                        f"{plan.memory.peak_bytes / 2**30:.1f} / {plan.memory.capacity_bytes / 2**30:.0f} |")
        check, rc = whole_command("--check", str(RECIPES))
        check_nw, rc_nw = whole_command("--check", "--no-weights", str(RECIPES))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        interpreter = time.perf_counter() - start
    print(f"Measured on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), Python "
          f"{platform.python_version()}, torch {torch.__version__} (not imported by the compiler), "
          f"{datetime.date.today().isoformat()}; median of 7, in-process:\n")
    print("| recipe | weight files | parameters | compile ms (headers read) | compile ms (--no-weights) | "
          "peak / capacity GiB |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nWhole commands (interpreter start {interpreter:.2f} s included): "
          f"`telefuser-compile --check recipes/` {check:.2f} s (exit {rc}); "
          f"`--check --no-weights recipes/` {check_nw:.2f} s (exit {rc_nw}).")


if __name__ == "__main__":
    main()
