"""Deterministic tiny HunyuanVideo-1.5 weights in Tencent's key layout, small enough for a 2-core CPU.

`python -m telefuser.models.hunyuan15.tiny FOLDER` writes, without any network:

- hy15_dit.safetensors       HunyuanVideo15DiT, the base (T2V) architecture: 9 input channels (4 latent + 4
                             condition latent + 1 mask), hidden 64, 2 heads of 32 (RoPE [4, 14, 14]), 2 double-stream
                             blocks, a 1-block token refiner; text 256 wide, byT5 16, SigLIP 144 (the tiny encoders')
- hy15_dit_i2v.safetensors   the same architecture with other values (the published I2V DiT is the T2V one's
                             architecture, trained for I2V)
- hy15_dit_sr.safetensors    the SR DiT: 14 input channels (+ 4 low-resolution latent + 1 mask) and MeanFlow's
                             time_r_in, otherwise as hy15_dit
- hy15_vae.safetensors       HunyuanVideo15VAE with the published 16x spatial / 4x temporal compression (five
                             levels of 4..16 channels, 1 residual block per level), 4 latent channels
- hy15_upsampler_720p.safetensors
                             the SR stage's latent upsampler (SRUpsampler720p: 8 hidden channels, 2 blocks)
- hy15_text_encoder.safetensors
                             Qwen25VLTextEncoder in the hub checkpoint's layout (`model.*`): hidden 256 (2 heads of
                             Qwen2.5-VL's 128, 1 key/value head), 3 layers of which the text stage runs 1
                             (hidden_states[-3]), the final norm; vocabulary of hy15_tokenizer.json
- hy15_tokenizer.json        a byte-level tokenizer (`tokenizers`) with Qwen's <|endoftext|>, <|im_start|>,
                             <|im_end|>: `text.tokenize_rendered` works on it as on Qwen2.5-VL's
- hy15_byt5.safetensors      ByT5Encoder (UMT5Encoder with one shared position table) in Hugging Face's T5 layout:
                             byT5's 384 byte ids, dim 16, 2 layers (`text.byt5_ids` tokenizes for it)

- hy15_image_encoder.safetensors
                             SigLIPVision in SiglipVisionModel's layout: 28-pixel images of 14-pixel patches (4
                             tokens), dim 144 (2 heads of so400m's 72), 2 layers

Names and shapes come from the model classes (built on the meta device); each tensor's values come from a generator
seeded by its file's role and its name, so the files are identical on every run and machine, stored in float32.
"""

from __future__ import annotations

import argparse
import math
import zlib
from pathlib import Path

import torch

SEED = 20251121
FILES = {"dit": "hy15_dit.safetensors", "dit_i2v": "hy15_dit_i2v.safetensors", "dit_sr": "hy15_dit_sr.safetensors",
         "vae": "hy15_vae.safetensors", "upsampler_720p": "hy15_upsampler_720p.safetensors",
         "text_encoder": "hy15_text_encoder.safetensors", "byt5": "hy15_byt5.safetensors",
         "image_encoder": "hy15_image_encoder.safetensors"}
TOKENIZER_FILE = "hy15_tokenizer.json"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 256, 257, 258 after the 256 bytes
LATENT = 4
_DIT = {"in_channels": 2 * LATENT + 1, "out_channels": LATENT, "hidden_size": 64, "heads_num": 2,
        "mlp_hidden_dim": 128, "double_blocks": 2, "single_blocks": 0, "patch_size": [1, 1, 1],
        "rope_dim_list": [4, 14, 14], "rope_theta": 256.0, "text_states_dim": 256, "refiner_blocks": 1, "byt5_dim": 16,
        "byt5_hidden": 32, "vision_states_dim": 144, "use_meanflow": False, "guidance_embed": False, "eps": 1e-6}
TINY_ARCH: dict[str, dict] = {
    "dit": _DIT,
    "dit_i2v": dict(_DIT),
    "dit_sr": {**_DIT, "in_channels": 3 * LATENT + 2, "use_meanflow": True},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": LATENT, "block_out_channels": [4, 8, 8, 16, 16],
            "layers_per_block": 1, "spatial_ratio": 16, "temporal_ratio": 4, "scaling_factor": 1.03682},
    "upsampler_720p": {"in_channels": LATENT, "out_channels": LATENT, "hidden_channels": 8, "num_blocks": 2,
                       "global_residual": False},
    "text_encoder": {"vocab_size": 256 + len(SPECIAL_TOKENS), "hidden_size": 256, "intermediate_size": 128,
                     "num_layers": 3, "num_heads": 2, "num_kv_heads": 1, "rope_theta": 1000000.0, "eps": 1e-6,
                     "skip_layers": 2},
    "byt5": {"vocab_size": 384, "dim": 16, "dim_attn": 16, "dim_ffn": 32, "num_heads": 2, "num_layers": 2,
             "num_buckets": 32, "shared_pos": True},
    "image_encoder": {"image_size": 28, "patch_size": 14, "dim": 144, "mlp_dim": 64, "num_heads": 2, "num_layers": 2,
                      "eps": 1e-6},
}
CLASSES = {"dit": "HunyuanVideo15DiT", "dit_i2v": "HunyuanVideo15DiT", "dit_sr": "HunyuanVideo15DiT",
           "vae": "HunyuanVideo15VAE", "upsampler_720p": "HunyuanVideo15SRUpsampler720p",
           "text_encoder": "Qwen25VLTextEncoder", "byt5": "ByT5Encoder", "image_encoder": "SigLIPVision"}


def _is_norm_scale(name: str, shape: tuple[int, ...]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gamma":
        return True
    if leaf != "weight" or sum(s > 1 for s in shape) > 1:
        return False
    return "norm" in name or name.startswith(("vision_in.proj.0.", "vision_in.proj.4.", "byt5_in.layernorm."))


def _value(name: str, shape: tuple[int, ...], salt: str) -> torch.Tensor:
    """A deterministic tensor for one weight, scaled so activations stay O(1) through the network."""
    generator = torch.Generator().manual_seed(SEED ^ zlib.crc32((salt + name).encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if _is_norm_scale(name, shape):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.02 * noise
    if name == "cond_type_embedding.weight":
        return 0.1 * noise
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return noise / math.sqrt(fan_in)


def tiny_state_dict(role: str) -> dict[str, torch.Tensor]:
    """Tencent-layout state dict of the tiny model with this role, from the model class's own keys."""
    from telefuser.models import registry

    entry = registry.get(CLASSES[role])
    arch = dict(TINY_ARCH[role])
    if role == "text_encoder":
        arch["skip_layers"] = 0  # a checkpoint holds every layer and the final norm; the encoder drops the unused
    with torch.device("meta"):
        model = entry.model_class(entry.config_class(**arch))
    state = {name: _value(name, tuple(t.shape), f"{role}:") for name, t in model.state_dict().items()}
    if role == "text_encoder":
        return {"model." + k: v for k, v in state.items()}  # the hub checkpoint's names
    if role == "byt5":
        from .byt5_keys import umt5_to_hf

        return umt5_to_hf(state)
    if role == "image_encoder":
        return {"vision_model." + k: v for k, v in state.items()}  # SiglipVisionModel's names
    return state


def build_tokenizer(path: str | Path) -> None:
    """A byte-level BPE without merges (every byte a token) plus Qwen's special tokens, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path))


def generate(folder: str | Path) -> dict[str, Path]:
    """Write the tiny HunyuanVideo-1.5 set into `folder`; returns role -> file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"tokenizer": folder / TOKENIZER_FILE}
    build_tokenizer(written["tokenizer"])
    for role, filename in FILES.items():
        # one metadata key: safetensors writes its metadata map in a random order, which would change the bytes
        save_file(tiny_state_dict(role), str(folder / filename), metadata={"format": "pt"})
        written[role] = folder / filename
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m telefuser.models.hunyuan15.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the tiny HunyuanVideo-1.5 set")
    for role, path in generate(parser.parse_args(argv).folder).items():
        print(f"{role:15s} {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
