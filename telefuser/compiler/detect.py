"""Which model a set of weights is, in which key layout, with which architecture numbers.

Pure functions of tensor names and shapes. The key signatures are those of the
official checkpoints: Wan's own layout and diffusers' / Hugging Face's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from telefuser.errors import WeightsError
from telefuser.models.registry import detect_hunyuan15, hunyuan15_used

from .weights import TensorInfo, WeightIndex

WAN_HEAD_DIM = 128  # every Wan DiT (1.3B: 1536/12, 14B: 5120/40); heads are not stored in the weights


@dataclass(frozen=True)
class Detection:
    class_name: str
    layout: str
    arch: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    found: Any = None  # a HunyuanVideo-1.5 detection's own record (telefuser.models.hunyuan15.detect.Found)


Shapes = dict[str, tuple[int, ...]]


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _dit(shapes: Shapes) -> Detection | None:
    if "time_projection.1.weight" in shapes:
        layout, n = "wan", {"text": "text_embedding.0.weight", "time": "time_embedding.0.weight",
                            "ffn": "blocks.0.ffn.0.weight", "head": "head.head.weight",
                            "qk": "blocks.0.self_attn.norm_q.weight", "xnorm": "blocks.0.norm3.weight", "img": "img_emb."}
    elif "condition_embedder.time_proj.weight" in shapes:
        layout, n = "diffusers", {"text": "condition_embedder.text_embedder.linear_1.weight",
                                  "time": "condition_embedder.time_embedder.linear_1.weight",
                                  "ffn": "blocks.0.ffn.net.0.proj.weight", "head": "proj_out.weight",
                                  "qk": "blocks.0.attn1.norm_q.weight", "xnorm": "blocks.0.norm2.weight",
                                  "img": "condition_embedder.image_embedder."}
    else:
        return None
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    image = any(k.startswith(n["img"]) for k in shapes)
    arch = {
        "model_type": "i2v" if image else "t2v",
        "patch_size": list(patch), "in_dim": in_dim, "dim": dim, "ffn_dim": shapes[n["ffn"]][0],
        "freq_dim": shapes[n["time"]][1], "text_dim": shapes[n["text"]][1],
        "out_dim": shapes[n["head"]][0] // math.prod(patch), "num_heads": max(dim // WAN_HEAD_DIM, 1),
        "num_layers": _count(shapes, r"blocks\.(\d+)\."), "qk_norm": n["qk"] in shapes,
        "cross_attn_norm": n["xnorm"] in shapes, "eps": 1e-6,
    }
    if image:  # the CLIP feature width: img_emb.proj.0 is the LayerNorm over it (diffusers: image_embedder.norm1)
        arch["image_dim"] = shapes[n["img"] + ("proj.0.weight" if layout == "wan" else "norm1.weight")][0]
    return Detection("WanDiT", layout, arch, [f"num_heads = dim // {WAN_HEAD_DIM} (Wan's head dim; not stored in weights)"])


def _vae(shapes: Shapes) -> Detection | None:
    if "encoder.downsamples.0.residual.0.gamma" in shapes:
        layout, stem, blocks, conv2, post = "wan", "encoder.conv1.weight", "encoder.downsamples", "residual.6.weight", "conv2.weight"
    elif "encoder.down_blocks.0.norm1.gamma" in shapes:
        layout, stem, blocks, conv2, post = "diffusers", "encoder.conv_in.weight", "encoder.down_blocks", "conv2.weight", "post_quant_conv.weight"
    else:
        return None
    base = shapes[stem][0]
    count = _count(shapes, re.escape(blocks) + r"\.(\d+)\.")
    mult, temporal, res_per_stage, current = [], [], [], 0
    for i in range(count):
        if f"{blocks}.{i}.{conv2}" in shapes:
            current += 1
            out_ch = shapes[f"{blocks}.{i}.{conv2}"][0]
        else:  # a resampler closes a stage
            mult.append(out_ch // base)
            temporal.append(f"{blocks}.{i}.time_conv.weight" in shapes)
            res_per_stage.append(current)
            current = 0
    mult.append(out_ch // base)
    res_per_stage.append(current)
    arch = {"z_dim": shapes[post][0], "base_dim": base, "dim_mult": mult, "num_res_blocks": res_per_stage[0],
            "temporal_downsample": temporal}
    return Detection("WanVAE", layout, arch)


def _vae22(shapes: Shapes) -> Detection | None:
    """The Wan2.2 VAE (TI2V-5B's `Wan2.2_VAE.pth`, diffusers' AutoencoderKLWan with is_residual): each encoder
    stage nests its residual blocks and resampler (`encoder.downsamples.i.downsamples.j`, diffusers'
    `encoder.down_blocks.i.resnets.j` / `.downsampler`); the video's 2x2 pixel blocks enter as channels."""
    if "encoder.downsamples.0.downsamples.0.residual.0.gamma" in shapes:
        layout, stem, dec_stem, post = "wan", "encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight"
        stage = r"encoder\.downsamples\.{i}\.downsamples\.(\d+)\.residual\."
        conv2, time_conv = "encoder.downsamples.{i}.downsamples.0.residual.6.weight", \
            r"encoder\.downsamples\.{i}\.downsamples\.\d+\.time_conv\.weight"
        stages = r"encoder\.downsamples\.(\d+)\."
    elif "encoder.down_blocks.0.resnets.0.norm1.gamma" in shapes:
        layout, stem, dec_stem, post = "diffusers", "encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight"
        stage = r"encoder\.down_blocks\.{i}\.resnets\.(\d+)\."
        conv2, time_conv = "encoder.down_blocks.{i}.resnets.0.conv2.weight", \
            r"encoder\.down_blocks\.{i}\.downsampler\.time_conv\.weight"
        stages = r"encoder\.down_blocks\.(\d+)\."
    else:
        return None
    base, pixels = shapes[stem][0], shapes[stem][1]
    patch = math.isqrt(pixels // 3)
    if 3 * patch * patch != pixels:
        raise ValueError(f"{stem} takes {pixels} channels, not 3 x patch x patch")
    count = _count(shapes, stages)
    mult = [shapes[conv2.format(i=i)][0] // base for i in range(count)]
    temporal = [any(re.match(time_conv.format(i=i), k) for k in shapes) for i in range(count - 1)]
    arch = {"z_dim": shapes[post][0], "base_dim": base, "decoder_base_dim": shapes[dec_stem][0] // mult[-1],
            "dim_mult": mult, "num_res_blocks": _count(shapes, stage.format(i=0)), "temporal_downsample": temporal,
            "patch_size": patch}
    return Detection("Wan22VAE", layout, arch)


def _umt5(shapes: Shapes) -> Detection | None:
    if "token_embedding.weight" in shapes and "blocks.0.attn.q.weight" in shapes:
        layout, emb, q, fc1, pos = "wan", "token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight", "blocks.0.pos_embedding.embedding.weight"
        shared = "pos_embedding.embedding.weight"
        layers = _count(shapes, r"blocks\.(\d+)\.")
    elif "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
        layout, q = "hf", "encoder.block.0.layer.0.SelfAttention.q.weight"
        emb = "encoder.embed_tokens.weight" if "encoder.embed_tokens.weight" in shapes else "shared.weight"
        fc1 = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
        pos = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        shared = None
        layers = _count(shapes, r"encoder\.block\.(\d+)\.")
    else:
        return None
    buckets, heads = shapes[pos if pos in shapes else shared]  # type: ignore[index]
    vocab, dim = shapes[emb]
    arch = {"vocab_size": vocab, "dim": dim, "dim_attn": shapes[q][0], "dim_ffn": shapes[fc1][0],
            "num_heads": heads, "num_layers": layers, "num_buckets": buckets,
            "shared_pos": shared is not None and shared in shapes}
    return Detection("UMT5Encoder", layout, arch)


CLIP_HEAD_DIM = 80  # ViT-H/14: 1280 / 16 heads; heads are not stored in the weights


def _clip(shapes: Shapes) -> Detection | None:
    """The vision tower: Wan's XLM-RoBERTa CLIP (`visual.transformer.N`), open_clip's
    (`visual.transformer.resblocks.N`) or Hugging Face's (`vision_model.encoder.layers.N`; transformers >= 5
    saves a bare CLIPVisionModel without the `vision_model.` prefix)."""
    if "visual.patch_embedding.weight" in shapes:
        layout, v, blocks = "wan", "visual.", r"visual\.transformer\.(\d+)\."
        stem, pos, mlp = "patch_embedding.weight", "pos_embedding", "transformer.0.mlp.0.weight"
    elif "visual.conv1.weight" in shapes:
        layout, v, blocks = "open_clip", "visual.", r"visual\.transformer\.resblocks\.(\d+)\."
        stem, pos, mlp = "conv1.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"
    elif "vision_model.embeddings.patch_embedding.weight" in shapes or "embeddings.patch_embedding.weight" in shapes:
        v = "vision_model." if "vision_model.embeddings.patch_embedding.weight" in shapes else ""
        layout, blocks = "hf", re.escape(v) + r"encoder\.layers\.(\d+)\."
        stem, pos, mlp = "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight"
    else:
        return None
    dim, _, patch, _ = shapes[v + stem]
    tokens = shapes[v + pos][-2]  # the class token and (image_size / patch_size)^2 patches
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise ValueError(f"{v + pos} of {tokens} positions, not a square grid plus the class token")
    arch = {"image_size": side * patch, "patch_size": patch, "dim": dim, "mlp_dim": shapes[v + mlp][0],
            "num_heads": max(dim // CLIP_HEAD_DIM, 1), "num_layers": _count(shapes, blocks), "eps": 1e-5,
            "activation": "gelu"}
    return Detection("CLIPVision", layout, arch,
                     [f"num_heads = dim // {CLIP_HEAD_DIM} (ViT-H/14's head dim; not stored in weights); "
                      "activation gelu and eps 1e-5 as open-clip's ViT-H/14"])


def _described(name: str, signature: Callable[[Shapes], bool]) -> Callable[[Shapes], Detection | None]:
    """Models whose keys module describes a checkpoint itself (RIFE's flownet.pkl, TAEHV): recognised by a few tensor
    names, then every name and shape checked by the registry's `describe` (ValueError: incomplete or damaged)."""
    def detector(shapes: Shapes) -> Detection | None:
        if not signature(shapes):
            return None
        from telefuser.models.registry import get

        entry = get(name)
        arch = entry.describe(shapes)
        return Detection(name, entry.detect_layout(shapes), arch)
    return detector


_rife = _described("RIFE", lambda s: any(k.removeprefix("module.") in ("encode.cnn0.weight", "block0.conv0.0.0.weight")
                                         for k in s))
_taehv = _described("TAEHV", lambda s: "decoder.1.weight" in s and "decoder.7.conv.weight" in s
                    or "decoder.0.weight" in s and "decoder.1.conv.0.weight" in s)

DETECTORS: list[Callable[[Shapes], Detection | None]] = [_dit, _vae, _vae22, _umt5, _clip, _rife, _taehv]


QWEN_TOKENIZER_MARK = b"<|im_start|>"  # Qwen2.5-VL's chat-template token: in its tokenizer.json, not in umT5's


def _tokenizer(path) -> Detection:
    try:
        qwen = QWEN_TOKENIZER_MARK in path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the tokenizer ({exc}).") from exc
    return Detection("Qwen25VLTokenizer" if qwen else "UMT5Tokenizer", "tokenizers", {})


def _hunyuan15(shapes: Shapes) -> Detection | None:
    """HunyuanVideo-1.5's models (telefuser.models.hunyuan15.detect through the registry); before Wan's detectors,
    which would take a diffusers-layout HY1.5 VAE for a Wan2.2 VAE and an HF T5 / SigLIP file for umT5 / CLIP."""
    found = detect_hunyuan15(shapes)
    if found is None:
        return None
    return Detection(found.class_name, found.layout, dict(found.arch), list(found.notes), found)


def detect(index: WeightIndex) -> Detection:
    if index.files and index.files[0].name.endswith(".json") and not index.tensors:
        return _tokenizer(index.files[0])
    shapes = {k: t.shape for k, t in index.tensors.items()}
    if "double_blocks.0.img_attn.qkv.weight" in shapes and "txt_in.input_embedder.weight" in shapes:
        raise WeightsError(f"{index.files[0]}: a HunyuanVideo DiT in ComfyUI's module names (Flux-style fused "
                           "double_blocks.N.img_attn.qkv, img_mod.lin, img_mlp.0: ComfyUI's repackaged files, their "
                           "fp8_scaled ones too), which TeleFuser does not read; use Tencent's or diffusers' "
                           "HunyuanVideo-1.5 transformer file (or LightX2V's FP8 one, in Tencent's names).")
    try:
        hy15 = _hunyuan15(shapes)
        if hy15 is not None:
            return hy15
        for detector in DETECTORS:
            found = detector(shapes)
            if found is not None:
                return found
    except (KeyError, ValueError, UnboundLocalError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise WeightsError(f"{index.files[0]}: looks like a known model but is incomplete ({what}); re-download it.") from exc
    sample = ", ".join(sorted(shapes)[:4])
    raise WeightsError(
        f"{index.files[0]}: the tensor names ({sample}, ...) match no model TeleFuser knows "
        "(Wan DiT, Wan2.1 VAE, Wan2.2 VAE, umT5 encoder, CLIP; Wan's or diffusers'/Hugging Face's layout; RIFE v4.26 "
        "flownet.pkl, TAEHV taew2_1/taew2_2/taehv1_5; HunyuanVideo-1.5's DiT, VAE, SR upsampler, Qwen2.5-VL, byT5, "
        "SigLIP)."
    )


def storage_dtype(tensors: dict[str, TensorInfo]) -> str:
    """The dtype of most parameters (by element count); norms kept in fp32 don't decide it."""
    totals: dict[str, int] = {}
    for t in tensors.values():
        totals[t.dtype] = totals.get(t.dtype, 0) + math.prod(t.shape)
    return max(totals, key=totals.get) if totals else "auto"  # type: ignore[arg-type]


# Tensors a checkpoint holds that its model drops on loading: a CLIP file's text tower, logit scale and projection
# heads (Wan's XLM-RoBERTa CLIP file is about half text tower), by layout.
_CLIP_VISION = {"wan": lambda k: k.startswith("visual.") and k != "visual.head",
                "open_clip": lambda k: k.startswith("visual.") and k != "visual.proj",
                "hf": lambda k: not k.startswith(("text_model.", "text_projection", "logit_scale", "visual_projection"))}


def used_tensors(det: Detection, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The tensors the model loads (what its weights cost in memory)."""
    if det.class_name in ("RIFE", "TAEHV"):  # a TAEHV file's encoder, a flownet's extra tensors: dropped on loading
        from telefuser.models.registry import get

        kept = get(det.class_name).convert(dict.fromkeys(tensors), det.layout)
        return {k: t for k, t in tensors.items() if k.removeprefix("module.") in kept}
    if det.found is not None:  # HunyuanVideo-1.5: a Qwen2.5-VL file's skipped layers, a SigLIP file's head, ...
        return {k: t for k, t in tensors.items() if hunyuan15_used(det.found, k)}
    if det.class_name != "CLIPVision":
        return tensors
    keep = _CLIP_VISION[det.layout]
    return {k: t for k, t in tensors.items() if keep(k)}


def parameter_count(tensors: dict[str, TensorInfo]) -> int:
    return sum(math.prod(t.shape) for t in tensors.values())
