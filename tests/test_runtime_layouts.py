"""The same tiny weights in other official layouts and containers give the same video.

DiT in diffusers' names, sharded with a .safetensors.index.json; VAE in diffusers'
names; umT5 in Hugging Face's names saved as a .pth (read with weights_only=True).
Conversions only rename (the tensors compare equal), but the tensors sit at other
memory alignments, and CPU kernels vectorise float32 sums differently by alignment
(the DiT's output moves by ~1e-6). Tolerance: no frame value more than 1 of 255
levels off, and under 0.1% of them off at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.models.t5.umt5_keys import wan_to_hf
from telefuser.models.wan.dit_keys import wan_to_diffusers as dit_to_diffusers
from telefuser.models.wan.vae_keys import wan_to_diffusers as vae_to_diffusers
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _run(recipe: Path) -> np.ndarray:
    plan_path = recipe.with_suffix(".plan.json")
    plan = compile_recipe(recipe)
    plan_path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    layouts = {m.name: m.key_layout for m in plan.layer1_model_definition.models}
    frames = telefuser.load_plan(str(plan_path)).run(prompt="a red fox", seed=4, progress=False).frames
    return frames, layouts


def test_diffusers_hf_sharded_and_pth_layouts_give_the_same_video(tmp_path):
    tiny = RECIPES / "tiny"
    dit = dit_to_diffusers(load_file(str(tiny / "dit.safetensors")))
    names = sorted(dit)
    half = len(names) // 2
    shards = {"transformer-00001-of-00002.safetensors": names[:half],
              "transformer-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: dit[k] for k in keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "transformer.safetensors.index.json").write_text(json.dumps(index))
    save_file(vae_to_diffusers(load_file(str(tiny / "vae.safetensors"))), str(tmp_path / "vae_diffusers.safetensors"))
    torch.save(wan_to_hf(load_file(str(tiny / "text_encoder.safetensors"))), tmp_path / "umt5_hf.pth")

    recipe = (RECIPES / "tiny.toml").read_text()
    (tmp_path / "wan.toml").write_text(recipe.replace('path = "tiny/', f'path = "{tiny}/'))
    (tmp_path / "other.toml").write_text(
        recipe.replace("tiny/dit.safetensors", "transformer.safetensors.index.json")
        .replace("tiny/vae.safetensors", "vae_diffusers.safetensors")
        .replace("tiny/text_encoder.safetensors", "umt5_hf.pth")
        .replace("tiny/tokenizer.json", f"{tiny}/tokenizer.json")
    )
    reference, wan_layouts = _run(tmp_path / "wan.toml")
    converted, other_layouts = _run(tmp_path / "other.toml")
    assert wan_layouts == {"dit": "wan", "vae": "wan", "text_encoder": "wan", "tokenizer": "tokenizers"}
    assert other_layouts == {"dit": "diffusers", "vae": "diffusers", "text_encoder": "hf", "tokenizer": "tokenizers"}
    diff = np.abs(reference.astype(np.int16) - converted.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
