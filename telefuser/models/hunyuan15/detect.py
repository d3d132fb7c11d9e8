"""What a HunyuanVideo-1.5 weight file is, in which key layout, with which architecture numbers: pure functions of
tensor names and shapes (a safetensors header is enough), for the compiler's detection (`telefuser.compiler.detect`
calls them and wraps the result in its `Detection`).

Each `detect_*` takes {tensor name: shape} and returns a `Found` or None (not this model). The `arch` dicts are the
config dataclasses' fields, so `Class(Config(**arch))` builds the model. Numbers the weights do not store are
named in `notes`.

Order matters against the Wan detectors: a diffusers-layout HunyuanVideo-1.5 VAE has
`encoder.down_blocks.0.resnets.0.norm1.gamma`, the key the Wan2.2 VAE detector keys on; run these first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

Shapes = dict[str, tuple[int, ...]]

PUBLISHED_HEAD_DIM = 128
PUBLISHED_ROPE_DIMS = [16, 56, 56]


@dataclass(frozen=True)
class Found:
    class_name: str  # the registry name
    layout: str  # "tencent" or "diffusers"
    arch: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    role: str = ""  # DiT: "base" (T2V/I2V, 2C+1 conditioning channels) or "sr" (2C+1 plus C+1 low-res channels)


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def rope_dims_for(head_dim: int) -> list[int]:
    """The published split of the head dim over (t, h, w), [16, 56, 56] of 128, scaled to another head dim:
    an eighth for time, the rest halved between height and width (each part even)."""
    t = max(2, head_dim // 8 // 2 * 2)
    hw = (head_dim - t) // 2 // 2 * 2
    return [head_dim - 2 * hw, hw, hw]


_DIT_NAMES = {
    "tencent": {
        "img_in": "img_in.proj.weight", "final": "final_layer.linear.weight", "qnorm": "double_blocks.0.img_attn_q_norm.weight",
        "fc1": "double_blocks.0.img_mlp.fc1.weight", "double": r"double_blocks\.(\d+)\.", "single": r"single_blocks\.(\d+)\.",
        "text": "txt_in.input_embedder.weight", "refiner": r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.",
        "byt5": "byt5_in.fc1.weight", "vision": "vision_in.proj.1.weight", "meanflow": "time_r_in.mlp.0.weight",
        "guidance": "guidance_in.mlp.0.weight",
    },
    "diffusers": {
        "img_in": "x_embedder.proj.weight", "final": "proj_out.weight", "qnorm": "transformer_blocks.0.attn.norm_q.weight",
        "fc1": "transformer_blocks.0.ff.net.0.proj.weight", "double": r"transformer_blocks\.(\d+)\.", "single": r"single_blocks\.(\d+)\.",
        "text": "context_embedder.proj_in.weight", "refiner": r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.",
        "byt5": "context_embedder_2.linear_1.weight", "vision": "image_embedder.linear_1.weight",
        "meanflow": "time_embed.timestep_embedder_r.linear_1.weight", "guidance": "guidance_in.mlp.0.weight",
    },
}


def detect_dit(shapes: Shapes) -> Found | None:
    if "txt_in.input_embedder.weight" in shapes and "img_in.proj.weight" in shapes:
        layout = "tencent"
    elif "context_embedder.proj_in.weight" in shapes and "x_embedder.proj.weight" in shapes \
            and "cond_type_embed.weight" in shapes:
        layout = "diffusers"
    else:
        return None
    n = _DIT_NAMES[layout]
    hidden, in_channels, *patch = shapes[n["img_in"]]
    head_dim = shapes[n["qnorm"]][0]
    out_channels = shapes[n["final"]][0] // math.prod(patch)
    arch = {
        "in_channels": in_channels, "out_channels": out_channels, "hidden_size": hidden,
        "heads_num": hidden // head_dim, "mlp_hidden_dim": shapes[n["fc1"]][0],
        "double_blocks": _count(shapes, n["double"]), "single_blocks": _count(shapes, n["single"]),
        "patch_size": list(patch),
        "rope_dim_list": PUBLISHED_ROPE_DIMS if head_dim == PUBLISHED_HEAD_DIM else rope_dims_for(head_dim),
        "rope_theta": 256.0, "text_states_dim": shapes[n["text"]][1], "refiner_blocks": _count(shapes, n["refiner"]),
        "byt5_dim": shapes[n["byt5"]][1], "byt5_hidden": shapes[n["byt5"]][0],
        "vision_states_dim": shapes[n["vision"]][1], "use_meanflow": n["meanflow"] in shapes,
        "guidance_embed": n["guidance"] in shapes, "eps": 1e-6,
    }
    if in_channels == 2 * out_channels + 1:
        role = "base"
    elif in_channels == 3 * out_channels + 2:
        role = "sr"
    else:
        raise ValueError(f"img_in takes {in_channels} channels: neither 2 x {out_channels} + 1 (base DiT) "
                         f"nor 3 x {out_channels} + 2 (SR DiT)")
    notes = ["heads_num = hidden / the q-norm width (the head dim)",
             "rope_dim_list and rope_theta (256) are the published ones; not stored in weights",
             "distillation (cfg-distilled, step-distilled) and sparse attention (SSTA) are not visible in the weights: "
             "the recipe declares them"]
    return Found("HunyuanVideo15DiT", layout, arch, notes, role)


def detect_vae(shapes: Shapes) -> Found | None:
    if "encoder.down.0.block.0.conv1.conv.weight" in shapes and "decoder.mid.attn_1.q.weight" in shapes:
        layout, level, res, down = "tencent", "encoder.down.{i}.block.0.conv1.conv.weight", \
            r"encoder\.down\.0\.block\.(\d+)\.", "encoder.down.{i}.downsample.conv.conv.weight"
    elif "encoder.down_blocks.0.resnets.0.conv1.conv.weight" in shapes and \
            "decoder.mid_block.attentions.0.to_q.weight" in shapes:
        layout, level, res, down = "diffusers", "encoder.down_blocks.{i}.resnets.0.conv1.conv.weight", \
            r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", "encoder.down_blocks.{i}.downsamplers.0.conv.conv.weight"
    else:
        return None
    levels = _count(shapes, r"encoder\.down(?:_blocks)?\.(\d+)\.")
    channels = [shapes[level.format(i=i)][0] for i in range(levels)]
    spatial = temporal = 0
    for i in range(levels):
        key = down.format(i=i)
        if key in shapes:
            spatial += 1
            temporal += shapes[key][0] * 8 == channels[i + 1]  # time is resampled: 2x2x2 pixels per channel
    arch = {"in_channels": shapes["encoder.conv_in.conv.weight"][1], "out_channels": shapes["decoder.conv_out.conv.weight"][0],
            "latent_channels": shapes["decoder.conv_in.conv.weight"][1], "block_out_channels": channels,
            "layers_per_block": _count(shapes, res), "spatial_ratio": 2 ** spatial, "temporal_ratio": 2 ** temporal,
            "scaling_factor": 1.03682}
    return Found("HunyuanVideo15VAE", layout, arch, ["scaling_factor 1.03682 is the published one; not stored in weights"])


def detect_upsampler(shapes: Shapes) -> Found | None:
    """The SR stage's latent upsamplers (`upsampler/720p_sr_distilled`, `upsampler/1080p_sr_distilled`)."""
    if "in_conv.conv.weight" in shapes and "blocks.0.block.0.conv.weight" in shapes:
        hidden, cin = shapes["in_conv.conv.weight"][:2]
        arch = {"in_channels": cin, "out_channels": shapes["out_conv.conv.weight"][0], "hidden_channels": hidden,
                "num_blocks": _count(shapes, r"blocks\.(\d+)\.block\."), "global_residual": False}
        return Found("HunyuanVideo15SRUpsampler720p", "tencent", arch,
                     ["global_residual False as published; not stored in weights"])
    if "conv_in.conv.weight" in shapes and "up.0.block.0.conv1.conv.weight" in shapes and not any(
            k.startswith(("encoder.", "decoder.")) for k in shapes):
        levels = _count(shapes, r"up\.(\d+)\.block\.")
        arch = {"z_channels": shapes["conv_in.conv.weight"][1], "out_channels": shapes["conv_out.conv.weight"][0],
                "block_out_channels": [shapes[f"up.{i}.block.0.conv1.conv.weight"][0] for i in range(levels)],
                "num_res_blocks": _count(shapes, r"up\.0\.block\.(\d+)\.") - 1}
        return Found("HunyuanVideo15SRUpsampler1080p", "tencent", arch)
    return None


QWEN_HEAD_DIM = 128  # Qwen2.5-VL-7B: 3584 / 28 heads; heads are not stored in the weights
_QWEN_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.", "")


def detect_qwen_text(shapes: Shapes) -> Found | None:
    """Qwen2.5-VL-7B-Instruct (the hub checkpoint, tencent/HunyuanVideo-1.5's `text_encoder/llm`, or diffusers'
    saved `Qwen2_5_VLTextModel`) as HunyuanVideo-1.5's text encoder."""
    prefix = next((p for p in _QWEN_PREFIXES if p + "embed_tokens.weight" in shapes
                   and p + "layers.0.self_attn.q_proj.weight" in shapes), None)
    if prefix is None or prefix + "layers.0.mlp.gate_proj.weight" not in shapes:
        return None
    vocab, hidden = shapes[prefix + "embed_tokens.weight"]
    kv = shapes[prefix + "layers.0.self_attn.k_proj.weight"][0] // QWEN_HEAD_DIM
    arch = {"vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": shapes[prefix + "layers.0.mlp.gate_proj.weight"][0],
            "num_layers": _count(shapes, re.escape(prefix) + r"layers\.(\d+)\."), "num_heads": hidden // QWEN_HEAD_DIM,
            "num_kv_heads": max(kv, 1), "rope_theta": 1000000.0, "eps": 1e-6, "skip_layers": 2}
    return Found("Qwen25VLTextEncoder", "hf", arch,
                 [f"heads = hidden / {QWEN_HEAD_DIM} (Qwen2.5-VL-7B's head dim; not stored in weights); rope_theta 1e6 "
                  "and eps 1e-6 as published; skip_layers 2 is HunyuanVideo-1.5's hidden_states[-3]: the last two "
                  "layers, the final norm, the LM head and the vision tower are not loaded (`qwen_text_used`)"])


def qwen_text_used(key: str, arch: dict[str, Any]) -> bool:
    """Whether the text encoder loads this tensor of a Qwen2.5-VL checkpoint (for its memory estimate)."""
    if key.startswith(("visual.", "model.visual.", "lm_head.")):
        return False
    for p in _QWEN_PREFIXES:
        if p and key.startswith(p):
            key = key[len(p):]
            break
    m = re.match(r"layers\.(\d+)\.", key)
    if m:
        return int(m.group(1)) < arch["num_layers"] - arch["skip_layers"]
    return key != "norm.weight" or arch["skip_layers"] == 0


def detect_byt5(shapes: Shapes) -> Found | None:
    """A T5 v1.1 encoder with one shared position table (byT5-small / Glyph-SDXL-v2's, 1472 wide), as
    `UMT5Encoder(shared_pos=True)`. Run before the umT5 detector, which would take an HF T5 encoder for a umT5."""
    for layout, prefix in (("hf", "encoder."), ("glyph", "module.text_tower.encoder."), ("glyph", "")):
        bias = prefix + "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        if bias in shapes and prefix + "block.0.layer.0.SelfAttention.q.weight" in shapes:
            break
    else:
        return None
    if prefix + "block.1.layer.0.SelfAttention.relative_attention_bias.weight" in shapes:
        return None  # a table per layer: umT5
    emb = prefix + "embed_tokens.weight" if prefix + "embed_tokens.weight" in shapes else "shared.weight"
    vocab, dim = shapes[emb]
    buckets, heads = shapes[bias]
    arch = {"vocab_size": vocab, "dim": dim, "dim_attn": shapes[prefix + "block.0.layer.0.SelfAttention.q.weight"][0],
            "dim_ffn": shapes[prefix + "block.0.layer.1.DenseReluDense.wi_0.weight"][0], "num_heads": heads,
            "num_layers": _count(shapes, re.escape(prefix) + r"block\.(\d+)\."), "num_buckets": buckets,
            "shared_pos": True}
    return Found("ByT5Encoder", layout, arch, ["T5 v1.1 encoder: UMT5Encoder with one shared position table"])


SIGLIP_HEAD_DIM = 72  # so400m: 1152 / 16 heads; heads are not stored in the weights


def detect_siglip(shapes: Shapes) -> Found | None:
    """SigLIP's vision tower (the I2V image encoder). Run before the CLIP detector, which keys on the same
    `vision_model.embeddings.patch_embedding.weight`; SigLIP has no class embedding."""
    for prefix in ("vision_model.", ""):
        if prefix + "embeddings.patch_embedding.weight" in shapes and prefix + "embeddings.position_embedding.weight" \
                in shapes and prefix + "post_layernorm.weight" in shapes:
            break
    else:
        return None
    if prefix + "embeddings.class_embedding" in shapes:
        return None  # CLIP
    dim, _, patch, _ = shapes[prefix + "embeddings.patch_embedding.weight"]
    side = math.isqrt(shapes[prefix + "embeddings.position_embedding.weight"][0])
    head_dim = SIGLIP_HEAD_DIM if dim % SIGLIP_HEAD_DIM == 0 else 64
    # so400m-patch14-384 takes 384-pixel images of which its 27 x 27 patches of 14 use 378: not derivable
    image_size = 384 if (side, patch) == (27, 14) else side * patch
    arch = {"image_size": image_size, "patch_size": patch, "dim": dim,
            "mlp_dim": shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0], "num_heads": dim // head_dim,
            "num_layers": _count(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\."), "eps": 1e-6}
    return Found("SigLIPVision", "hf", arch, [f"num_heads = dim / {head_dim} (so400m's head dim 72 where it divides, "
                                              "else 64; not stored in weights); eps 1e-6 as published; image_size 384 "
                                              "for 27 x 27 patches of 14 (so400m-patch14-384)"])


DETECTORS = (detect_dit, detect_vae, detect_upsampler, detect_qwen_text, detect_byt5, detect_siglip)


def detect(shapes: Shapes) -> Found | None:
    for detector in DETECTORS:
        found = detector(shapes)
        if found is not None:
            return found
    return None


def used(found: Found, key: str) -> bool:
    """Whether the model `found` describes loads this tensor of its file (for the memory estimate): a Qwen2.5-VL
    file's skipped layers, LM head and vision tower, a SigLIP file's head and text tower, a T5 file's decoder are
    not loaded."""
    if found.class_name == "Qwen25VLTextEncoder":
        return qwen_text_used(key, found.arch)
    if found.class_name == "SigLIPVision":
        bare = key[len("vision_model."):] if key.startswith("vision_model.") else key
        return not bare.startswith(("head.", "text_model.", "logit_scale", "logit_bias", "embeddings.position_ids"))
    if found.class_name == "ByT5Encoder":
        return not key.startswith(("decoder.", "lm_head."))
    return True

