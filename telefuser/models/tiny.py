"""The embedded tiny default: a Wan2.1-architecture model set small enough for a 2-core CPU.

`python -m telefuser.models.tiny recipes/tiny` writes, without any network:

- dit.safetensors           WanDiT (dim 64, 2 heads of 32, 2 layers), Wan's key names
- vae.safetensors           WanVAE (z_dim 16, base_dim 4, 1 residual block per level), Wan's key names
- text_encoder.safetensors  UMT5Encoder (dim 32, 2 layers), Wan's key names
- tokenizer.json            the tiny umT5-style tokenizer (its vocabulary sizes the encoder)
- dit_i2v.safetensors       WanDiT of Wan2.1 image-to-video (model_type i2v: 36 input channels, img_emb,
                            k_img/v_img), otherwise as dit.safetensors, Wan's key names
- image_encoder.safetensors CLIPVision: a ViT in the layout of Wan's open-clip ViT-H/14 (`visual.*`; 28 px
                            images of 14 px patches, dim 32, 3 blocks), whose width the I2V DiT's img_emb takes
- dit_wan22_i2v_high.safetensors, dit_wan22_i2v_low.safetensors
                            the Wan2.2 I2V A14B pair of experts (high noise, low noise): WanDiT with 36 input
                            channels (noise, 4 mask and 16 image-latent channels) and no img_emb (Wan2.2 has no
                            CLIP), otherwise as dit.safetensors; the two hold different values
- dit_ti2v.safetensors      the Wan2.2 TI2V-5B architecture: WanDiT with 48 input and output channels (the Wan2.2
                            VAE's latent), no img_emb, otherwise as dit.safetensors
- vae22.safetensors         Wan22VAE (z_dim 48, so Wan2.2's latent statistics; base_dim 4, decoder_base_dim 4,
                            1 residual block per encoder stage), Wan's key names

- dit_fp8_scaled.safetensors the DiT of dit.safetensors as a ComfyUI/Kijai "scaled" FP8 checkpoint: the blocks'
                            linear weights in float8_e4m3fn, each with its float32 `scale_weight`, the `scaled_fp8`
                            marker; embeddings, norms, biases, modulation and head stay float32
- lora_distill.safetensors  a LoRA for dit.safetensors in the layout of lightx2v's distill LoRAs: kohya names under
                            `diffusion_model.` (`lora_down`/`lora_up`/`alpha`, rank 4, on every block linear) and
                            full differences `.diff_b` (those linears' biases), `.diff` (q/k norms, head),
                            `blocks.N.diff_m` (modulation)

The Wan2.2 files are stored in bfloat16 (as Wan2.2's checkpoints are), which keeps the set small; the tiny
recipes compute in float32.

Key names and shapes come from the model classes themselves (built on the meta
device, so nothing is allocated); every tensor's values come from a generator
seeded by its name, so the files are identical on every run and machine. The
weights are random: the video is structured noise, but every stage runs for real.
"""

from __future__ import annotations

import argparse
import math
import re
import zlib
from pathlib import Path

import torch

SEED = 20250601
FILES = {"dit": "dit.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors",
         "dit_i2v": "dit_i2v.safetensors", "image_encoder": "image_encoder.safetensors",
         "dit_wan22_i2v_high": "dit_wan22_i2v_high.safetensors", "dit_wan22_i2v_low": "dit_wan22_i2v_low.safetensors",
         "dit_ti2v": "dit_ti2v.safetensors", "vae22": "vae22.safetensors"}
# Files derived from the DiT of dit.safetensors: its FP8 checkpoint and a LoRA for it (fp8_checkpoint, distill_lora).
DERIVED = {"dit_fp8_scaled": "dit_fp8_scaled.safetensors", "lora_distill": "lora_distill.safetensors"}
TOKENIZER_FILE = "tokenizer.json"

TINY_ARCH: dict[str, dict] = {
    "dit": {
        "model_type": "t2v",
        "patch_size": [1, 2, 2],
        "in_dim": 16,
        "dim": 64,
        "ffn_dim": 128,
        "freq_dim": 32,
        "text_dim": 32,
        "out_dim": 16,
        "num_heads": 2,  # head_dim 32: 3-D RoPE pairs 6 (frames) + 5 (height) + 5 (width)
        "num_layers": 2,
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
    },
    "vae": {
        "z_dim": 16,
        "base_dim": 4,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 1,
        "temporal_downsample": [False, True, True],
    },
    "text_encoder": {
        "vocab_size": None,  # the tokenizer's vocabulary size
        "dim": 32,
        "dim_attn": 32,
        "dim_ffn": 64,
        "num_heads": 2,
        "num_layers": 2,
        "num_buckets": 32,
        "shared_pos": False,
    },
    "image_encoder": {
        "image_size": 28,  # 2 x 2 patches + the class token = 5 tokens
        "patch_size": 14,
        "dim": 32,
        "mlp_dim": 64,
        "num_heads": 2,
        "num_layers": 3,  # Wan runs all but the last: the penultimate block's tokens
        "eps": 1e-5,
        "activation": "gelu",
    },
}
# Wan2.1 image-to-video's DiT: the text-to-video one with the noise, 4 mask and 16 image-latent channels in, and
# image cross-attention over the CLIP tokens (of the tiny encoder's width).
TINY_ARCH["dit_i2v"] = {**TINY_ARCH["dit"], "model_type": "i2v", "in_dim": 36,
                        "image_dim": TINY_ARCH["image_encoder"]["dim"]}
# Wan2.2 image-to-video A14B: two experts with Wan2.1 I2V's 36 input channels but no image cross-attention.
TINY_ARCH["dit_wan22_i2v_high"] = {**TINY_ARCH["dit"], "in_dim": 36}
TINY_ARCH["dit_wan22_i2v_low"] = dict(TINY_ARCH["dit_wan22_i2v_high"])
# Wan2.2 TI2V-5B: the latent of the Wan2.2 VAE in and out (48 channels), no image cross-attention.
TINY_ARCH["dit_ti2v"] = {**TINY_ARCH["dit"], "in_dim": 48, "out_dim": 48}
TINY_ARCH["vae22"] = {
    "z_dim": 48,  # Wan2.2's: its published latent statistics apply
    "base_dim": 4,
    "decoder_base_dim": 4,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "temporal_downsample": [False, True, True],
    "patch_size": 2,
}
CLASSES = {"dit": "WanDiT", "vae": "WanVAE", "text_encoder": "UMT5Encoder", "dit_i2v": "WanDiT",
           "image_encoder": "CLIPVision", "dit_wan22_i2v_high": "WanDiT", "dit_wan22_i2v_low": "WanDiT",
           "dit_ti2v": "WanDiT", "vae22": "Wan22VAE"}
# Roles whose tensors are seeded by role and name (the two experts share every name) and stored in bfloat16; the
# files of the other roles, older, are seeded by name alone and stored in float32.
WAN22_ROLES = ("dit_wan22_i2v_high", "dit_wan22_i2v_low", "dit_ti2v", "vae22")
# The LayerNorms of the I2V DiT's img_emb (proj.0, proj.4): their names do not say "norm".
NORM_WEIGHTS = {"img_emb.proj.0.weight", "img_emb.proj.4.weight"}


def _value(name: str, shape: tuple[int, ...], salt: str = "") -> torch.Tensor:
    """A deterministic tensor for one weight, scaled so activations stay O(1) through the network."""
    generator = torch.Generator().manual_seed(SEED ^ zlib.crc32((salt + name).encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    is_norm_scale = leaf == "gamma" or ("norm" in name and leaf == "weight" and len([s for s in shape if s > 1]) <= 1) \
        or name in NORM_WEIGHTS
    if is_norm_scale:
        return 1.0 + 0.1 * noise
    if leaf == "bias":
        return 0.02 * noise
    if leaf == "modulation":
        return noise / math.sqrt(shape[-1])
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return noise / math.sqrt(fan_in)


def tiny_arch(vocab_size: int) -> dict[str, dict]:
    arch = {role: dict(values) for role, values in TINY_ARCH.items()}
    arch["text_encoder"]["vocab_size"] = vocab_size
    return arch


def tiny_state_dict(role: str, arch: dict) -> dict[str, torch.Tensor]:
    """Wan-layout state dict of the tiny model with this role, built from the model class's keys."""
    from telefuser.models import registry

    entry = registry.get(CLASSES[role])
    model_class, config = entry.model_class, entry.config_class(**arch)
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        model = model_class(config)
    if role in WAN22_ROLES:
        return {name: _value(name, tuple(t.shape), salt=f"{role}:").to(torch.bfloat16)
                for name, t in model.state_dict().items()}
    return {name: _value(name, tuple(t.shape)) for name, t in model.state_dict().items()}


# The linears the published fp8 checkpoints store in float8 (LightX2V's converter: self_attn, cross_attn, ffn).
BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.((self|cross)_attn\.(q|k|v|o|k_img|v_img)|ffn\.[02])\.weight$")


def quantise_fp8(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale) with weight ~= q * scale: scale = amax / 448, per tensor ([]) or
    per output channel ([out, 1], as LightX2V stores it)."""
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = amax.clamp(min=1e-12) / 448.0
    return (w / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def fp8_checkpoint(state: dict[str, torch.Tensor], scale_key: str | None = "scale_weight",
                   per_channel: bool = False, marker: bool = True) -> dict[str, torch.Tensor]:
    """A Wan-layout DiT state dict as a pre-quantised FP8 checkpoint: the blocks' linear weights in float8 with a
    `<layer>.<scale_key>` each (None: plain float8, scale 1), plus ComfyUI's `scaled_fp8` marker."""
    out = {}
    for name, tensor in state.items():
        if not BLOCK_LINEAR.match(name):
            out[name] = tensor
        elif scale_key is None:
            out[name] = tensor.to(torch.float8_e4m3fn)
        else:
            out[name], scale = quantise_fp8(tensor, per_channel)
            out[name[: -len("weight")] + scale_key] = scale
    if marker and scale_key is not None:
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)  # as LightX2V's converter writes it
    return out


def distill_lora(state: dict[str, torch.Tensor], rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A LoRA for a Wan-layout DiT in the layout of lightx2v's distill LoRAs (see the module docstring)."""
    out = {}
    for name, tensor in state.items():
        module = name.rsplit(".", 1)[0]
        if BLOCK_LINEAR.match(name):
            out[f"diffusion_model.{module}.lora_down.weight"] = 0.5 * _value(f"lora:{module}.down", (rank, tensor.shape[1]))
            out[f"diffusion_model.{module}.lora_up.weight"] = 0.5 * _value(f"lora:{module}.up", (tensor.shape[0], rank))
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
            out[f"diffusion_model.{module}.diff_b"] = _value(f"lora:{module}.bias", tuple(state[module + ".bias"].shape))
        elif name.endswith(("norm_q.weight", "norm_k.weight")) or name == "head.head.weight":
            out[f"diffusion_model.{module}.diff"] = 0.05 * _value(f"lora:{name}", tuple(tensor.shape))
        elif re.match(r"^blocks\.\d+\.modulation$", name):
            out[f"diffusion_model.{module}.diff_m"] = 0.1 * _value(f"lora:{name}", tuple(tensor.shape))
    return out


def generate(folder: str | Path) -> dict[str, Path]:
    """Write the tiny model set into `folder`; returns role -> file."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from telefuser.models.t5.tokenizer import build_tiny_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_path = folder / TOKENIZER_FILE
    build_tiny_tokenizer(tokenizer_path)
    arch = tiny_arch(Tokenizer.from_file(str(tokenizer_path)).get_vocab_size())
    written = {"tokenizer": tokenizer_path}
    for role, filename in FILES.items():
        state = tiny_state_dict(role, arch[role])
        save_file(state, str(folder / filename), metadata={"format": "pt", "telefuser": "tiny"})
        written[role] = folder / filename
        if role == "dit":
            for extra, variant in (("dit_fp8_scaled", fp8_checkpoint(state)), ("lora_distill", distill_lora(state))):
                written[extra] = folder / DERIVED[extra]
                save_file(variant, str(written[extra]), metadata={"format": "pt", "telefuser": "tiny"})
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m telefuser.models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the tiny model set (e.g. recipes/tiny)")
    for role, path in generate(parser.parse_args(argv).folder).items():
        print(f"{role:13s} {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
