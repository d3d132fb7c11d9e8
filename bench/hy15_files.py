"""HunyuanVideo-1.5's published files as headers only (names, shapes, dtypes, sizes; no tensor data on disk), laid
out as tencent/HunyuanVideo-1.5 downloads them under a model root, for compiling the shipped recipes against what
the compiler reads from the real files (bench/compile.py, tests/test_hy15_plan.py).

Shapes come from the model classes at the published configurations built on the meta device; the Qwen2.5-VL file
holds all 28 layers, the final norm and the LM head (the vision tower left out), the byT5 file is Glyph-SDXL-v2's
`byt5_model.pt` layout (`module.text_tower.encoder.*` under `state_dict`), SigLIP SiglipVisionModel's names."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bench.compile import write_safetensors_index_only

REPO = Path(__file__).resolve().parents[1]


def _shapes(class_name: str, **arch) -> dict[str, tuple[int, ...]]:
    from telefuser.models import registry

    entry = registry.get(class_name)
    with torch.device("meta"):
        model = entry.model_class(entry.config_class(**arch))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_index_only(path, shapes, dtype)


def write_hunyuan15_root(root: Path) -> Path:
    """`root/HunyuanVideo-1.5/...` as the shipped recipes name it; returns that folder."""
    from telefuser.models.hunyuan15.byt5_keys import umt5_to_hf
    from telefuser.models.hunyuan15.dit_config import HUNYUAN15_8B, HUNYUAN15_SR_8B
    from dataclasses import asdict

    hy = root / "HunyuanVideo-1.5"
    base = _shapes("HunyuanVideo15DiT", **asdict(HUNYUAN15_8B))
    for version in ("480p_t2v", "720p_t2v", "480p_i2v", "720p_i2v", "480p_i2v_step_distilled",
                    "720p_t2v_distilled_sparse", "720p_i2v_distilled_sparse"):
        write_header_only(hy / "transformer" / version / "diffusion_pytorch_model.safetensors", base, torch.bfloat16)
    for version in ("720p_sr_distilled", "1080p_sr_distilled"):
        write_header_only(hy / "transformer" / version / "diffusion_pytorch_model.safetensors",
                          _shapes("HunyuanVideo15DiT", **asdict(HUNYUAN15_SR_8B)), torch.bfloat16)
    write_header_only(hy / "vae" / "diffusion_pytorch_model.safetensors", _shapes("HunyuanVideo15VAE"), torch.float32)
    write_header_only(hy / "upsampler" / "720p_sr_distilled" / "diffusion_pytorch_model.safetensors",
                      _shapes("HunyuanVideo15SRUpsampler720p"), torch.float32)
    write_header_only(hy / "upsampler" / "1080p_sr_distilled" / "diffusion_pytorch_model.safetensors",
                      _shapes("HunyuanVideo15SRUpsampler1080p"), torch.float32)
    qwen = {"model." + k: v for k, v in _shapes("Qwen25VLTextEncoder", skip_layers=0).items()}
    qwen["lm_head.weight"] = (152064, 3584)
    write_header_only(hy / "text_encoder" / "llm" / "model.safetensors", qwen, torch.bfloat16)
    shutil.copy(REPO / "recipes" / "tiny_hy15" / "hy15_tokenizer.json", hy / "text_encoder" / "llm" / "tokenizer.json")
    # byT5-small's 384 byte ids (Tencent's file adds rows for its color and font tokens: not modelled here)
    byt5 = umt5_to_hf(_shapes("ByT5Encoder", vocab_size=384, dim=1472, dim_attn=384, dim_ffn=3584, num_heads=6,
                              num_layers=12, num_buckets=32, shared_pos=True))
    byt5["encoder.embed_tokens.weight"] = byt5.pop("shared.weight")
    glyph = {"module.text_tower." + k: torch.zeros((), dtype=torch.float32).expand(s) for k, s in byt5.items()}
    path = hy / "text_encoder" / "Glyph-SDXL-v2" / "checkpoints" / "byt5_model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": glyph}, path)
    siglip = {"vision_model." + k: v for k, v in _shapes("SigLIPVision").items()}
    write_header_only(hy / "vision_encoder" / "siglip" / "model.safetensors", siglip, torch.bfloat16)
    return hy
