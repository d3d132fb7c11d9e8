"""CLIP vision-tower key layouts: Wan's own (canonical here), open_clip's and Hugging Face's.

- "wan": `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`, Wan's XLMRobertaCLIP state dict:
  visual.{patch_embedding.weight, cls_embedding, pos_embedding, pre_norm.*, post_norm.*, head} and
  visual.transformer.{i}.{norm1, attn.to_qkv, attn.proj, norm2, mlp.0, mlp.2}.*, next to the text
  tower (`textual.*`) and `log_scale`.
- "open_clip": open_clip's VisionTransformer (`visual.conv1.weight`, `visual.class_embedding`,
  `visual.positional_embedding`, `visual.ln_pre`, `visual.transformer.resblocks.{i}.{ln_1,
  attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `visual.ln_post`,
  `visual.proj`), its text tower at the top level.
- "hf": transformers' CLIPVisionModel(WithProjection) / CLIPModel, as diffusers' Wan2.1 I2V repos ship
  `image_encoder/` (`vision_model.embeddings.*`, `vision_model.pre_layrnorm`,
  `vision_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1/2, mlp.fc1/fc2}`,
  `vision_model.post_layernorm`, `visual_projection.weight`). transformers >= 5 saves a bare
  CLIPVisionModel without the `vision_model.` prefix; both spellings are accepted.

What the model does not use is dropped on the way in, never refused: text towers, logit scales and
the projection heads (Wan's `visual.head`, open_clip's `visual.proj`, HF's `visual_projection`; Wan's
features stop before them). Any other unknown key is refused. HF's separate q/k/v are concatenated
into Wan's `to_qkv` (rows q, k, v), and the class / position embeddings gain Wan's leading singleton
dimensions: conversion copies those tensors, everything else is passed through as is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

# (Wan, Hugging Face without "vision_model.") per-block suffix pairs of equal shapes.
_HF_BLOCK_PAIRS = [
    ("norm1", "layer_norm1"),
    ("attn.proj", "self_attn.out_proj"),
    ("norm2", "layer_norm2"),
    ("mlp.0", "mlp.fc1"),
    ("mlp.2", "mlp.fc2"),
]
_HF_TOP_PAIRS = [
    ("patch_embedding.weight", "embeddings.patch_embedding.weight"),
    ("pre_norm.weight", "pre_layrnorm.weight"),
    ("pre_norm.bias", "pre_layrnorm.bias"),
    ("post_norm.weight", "post_layernorm.weight"),
    ("post_norm.bias", "post_layernorm.bias"),
]
_OPEN_CLIP_BLOCK_PAIRS = [
    ("norm1.weight", "ln_1.weight"),
    ("norm1.bias", "ln_1.bias"),
    ("attn.to_qkv.weight", "attn.in_proj_weight"),
    ("attn.to_qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.weight", "attn.out_proj.weight"),
    ("attn.proj.bias", "attn.out_proj.bias"),
    ("norm2.weight", "ln_2.weight"),
    ("norm2.bias", "ln_2.bias"),
    ("mlp.0.weight", "mlp.c_fc.weight"),
    ("mlp.0.bias", "mlp.c_fc.bias"),
    ("mlp.2.weight", "mlp.c_proj.weight"),
    ("mlp.2.bias", "mlp.c_proj.bias"),
]
_OPEN_CLIP_TOP_PAIRS = [
    ("patch_embedding.weight", "conv1.weight"),
    ("pre_norm.weight", "ln_pre.weight"),
    ("pre_norm.bias", "ln_pre.bias"),
    ("post_norm.weight", "ln_post.weight"),
    ("post_norm.bias", "ln_post.bias"),
]
_WAN_BLOCK_SUFFIXES = {p[0] for p in _OPEN_CLIP_BLOCK_PAIRS}
_WAN_TOP = {"patch_embedding.weight", "cls_embedding", "pos_embedding", "pre_norm.weight", "pre_norm.bias",
            "post_norm.weight", "post_norm.bias"}

_WAN_BLOCK = re.compile(r"^visual\.transformer\.(\d+)\.(.+)$")
_OPEN_CLIP_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^(?:vision_model\.)?encoder\.layers\.(\d+)\.(.+)$")
_HF_VISION = ("vision_model.", "embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")

_WAN_UNUSED = ("visual.head",)  # the projection to the joint embedding (pool 'token')
_OPEN_CLIP_UNUSED = ("visual.proj",)
_HF_UNUSED = ("embeddings.position_ids",)  # a buffer older transformers saved


def detect_layout(keys: Iterable[str]) -> str:
    """'wan', 'open_clip' or 'hf', from the keys of a CLIP (or CLIP vision) state dict."""
    keys = list(keys)
    if "visual.patch_embedding.weight" in keys or any(_WAN_BLOCK.match(k) for k in keys):
        return "wan"
    if "visual.conv1.weight" in keys or any(_OPEN_CLIP_BLOCK.match(k) for k in keys):
        return "open_clip"
    if any(_HF_BLOCK.match(k) or k.endswith("embeddings.patch_embedding.weight") and k.startswith(_HF_VISION)
           for k in keys):
        return "hf"
    raise ValueError("these keys are neither Wan's CLIP vision layout (visual.patch_embedding.weight, "
                     "visual.transformer.N.*), open_clip's (visual.conv1.weight, visual.transformer.resblocks.N.*) "
                     "nor Hugging Face's CLIPVisionModel (vision_model.encoder.layers.N.*)")


def _unexpected(key: str, layout: str) -> ValueError:
    return ValueError(f"unexpected key {key!r} in a CLIP vision state dict of the {layout} layout")


def _from_wan(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith("visual.") or key in _WAN_UNUSED:
            continue  # the text tower (textual.*), log_scale, the projection head
        m = _WAN_BLOCK.match(key)
        if (m and m.group(2) in _WAN_BLOCK_SUFFIXES) or key.removeprefix("visual.") in _WAN_TOP:
            out[key] = value
        else:
            raise _unexpected(key, "Wan")
    return out


def open_clip_to_wan(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {f"visual.{oc}": f"visual.{wan}" for wan, oc in _OPEN_CLIP_TOP_PAIRS}
    block = {oc: wan for wan, oc in _OPEN_CLIP_BLOCK_PAIRS}
    out = {}
    for key, value in state.items():
        m = _OPEN_CLIP_BLOCK.match(key)
        if not key.startswith("visual.") or key in _OPEN_CLIP_UNUSED:
            continue  # the text tower, logit_scale, the projection
        if key in top:
            out[top[key]] = value
        elif key == "visual.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif key == "visual.positional_embedding":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif m and m.group(2) in block:
            out[f"visual.transformer.{m.group(1)}.{block[m.group(2)]}"] = value
        else:
            raise _unexpected(key, "open_clip")
    return out


def hf_to_wan(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {hf: f"visual.{wan}" for wan, hf in _HF_TOP_PAIRS}
    block = {f"{hf}.{p}": f"{wan}.{p}" for wan, hf in _HF_BLOCK_PAIRS for p in ("weight", "bias")}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    out = {}
    for full_key, value in state.items():
        if not full_key.startswith(_HF_VISION):
            continue  # text_model.*, text_projection, visual_projection, logit_scale
        key = full_key.removeprefix("vision_model.")
        m = _HF_BLOCK.match(key)
        qkv_m = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m.group(2)) if m else None
        if key in _HF_UNUSED:
            continue
        if key in top:
            out[top[key]] = value
        elif key == "embeddings.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif m and m.group(2) in block:
            out[f"visual.transformer.{m.group(1)}.{block[m.group(2)]}"] = value
        elif m and qkv_m:
            qkv.setdefault((int(m.group(1)), qkv_m.group(2)), {})[qkv_m.group(1)] = value
        else:
            raise _unexpected(full_key, "Hugging Face")
    for (i, param), parts in sorted(qkv.items()):
        missing = [f"encoder.layers.{i}.self_attn.{n}_proj.{param}" for n in "qkv" if n not in parts]
        if missing:
            raise ValueError(f"a Hugging Face CLIP vision state dict without {', '.join(missing)}")
        out[f"visual.transformer.{i}.attn.to_qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def wan_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's layout -> the `vision_model.*` keys of transformers' CLIPVisionModel as diffusers' files hold them."""
    top = {f"visual.{wan}": hf for wan, hf in _HF_TOP_PAIRS}
    block = {f"{wan}.{p}": f"{hf}.{p}" for wan, hf in _HF_BLOCK_PAIRS for p in ("weight", "bias")}
    out = {}
    for key, value in _from_wan(state).items():
        m = _WAN_BLOCK.match(key)
        if key in top:
            out[top[key]] = value
        elif key == "visual.cls_embedding":
            out["embeddings.class_embedding"] = value.reshape(-1)
        elif key == "visual.pos_embedding":
            out["embeddings.position_embedding.weight"] = value.squeeze(0)
        elif m and m.group(2) in block:
            out[f"encoder.layers.{m.group(1)}.{block[m.group(2)]}"] = value
        else:  # attn.to_qkv.{weight,bias}
            param = m.group(2).rsplit(".", 1)[1]  # type: ignore[union-attr]
            for name, part in zip("qkv", value.chunk(3)):
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}_proj.{param}"] = part  # type: ignore[union-attr]
    return {f"vision_model.{k}": v for k, v in out.items()}


def to_wan_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> Wan's `visual.*` keys, with everything the encoder does not use dropped.

    Unlike the other models' key modules, Wan's own layout is filtered too: its CLIP file holds the
    text tower beside the vision tower."""
    layout = detect_layout(state.keys())
    if layout == "wan":
        return _from_wan(state)
    return open_clip_to_wan(state) if layout == "open_clip" else hf_to_wan(state)
