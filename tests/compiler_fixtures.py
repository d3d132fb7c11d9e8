"""Small model sets on disk, in either key layout, and recipes pointing at them."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny"

RECIPE = """\
name = "t"
[target]
device = "cpu"
[layer1]
torch_dtype = "float32"
[[layer1.models]]
name = "dit"
role = "dit"
path = "dit.safetensors"
arch = {{ num_heads = 2 }}
{dit_extra}
[[layer1.models]]
name = "vae"
role = "vae"
path = "vae.safetensors"
[[layer1.models]]
name = "text_encoder"
role = "text_encoder"
path = "text_encoder.safetensors"
[[layer1.models]]
name = "tokenizer"
role = "tokenizer"
path = "tokenizer.json"
[layer2]
num_inference_steps = 2
num_frames = 5
text_len = 16
{layer2_extra}
[layer3.resolution]
default = "144p"
choices = ["144p"]
"""


def model_set(folder: Path, layout: str = "wan") -> Path:
    """Copy the tiny model set into `folder`, converting DiT/VAE/umT5 keys for layout 'diffusers'."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dit.safetensors", "vae.safetensors", "text_encoder.safetensors", "tokenizer.json"):
        shutil.copy(TINY / name, folder / name)
    if layout == "diffusers":
        from telefuser.models.t5.umt5_keys import wan_to_hf
        from telefuser.models.wan import dit_keys, vae_keys

        for name, convert in (("dit", dit_keys.wan_to_diffusers), ("vae", vae_keys.wan_to_diffusers),
                              ("text_encoder", wan_to_hf)):
            state = {k: v.contiguous() for k, v in convert(load_file(folder / f"{name}.safetensors")).items()}
            if name == "text_encoder":
                state.pop("shared.weight")  # tied to encoder.embed_tokens, stored once as HF does
            save_file(state, folder / f"{name}.safetensors")
    return folder


def write_recipe(folder: Path, dit_extra: str = "", layer2_extra: str = "", name: str = "recipe.toml") -> Path:
    path = folder / name
    path.write_text(RECIPE.format(dit_extra=dit_extra, layer2_extra=layer2_extra), encoding="utf-8")
    return path
