"""Which pre-quantised FP8 files of HunyuanVideo-1.5's DiT are read, decided from the header alone.

Established (ModelTC/LightX2V, commit f8aee98): its converter (`tools/convert/converter.py`, model type
`hunyuan_dit`) quantises the 2-D `.weight` of the double-stream blocks' linears whose third name part is
img_mod / img_attn_{q,k,v,proj} / img_mlp and their txt_ twins (14 per block), keeps Tencent's names and casts
every other tensor to float32. `tools/convert/quant/quant.py` "fp8": per output row s = max(|w|, 1e-5) / 448,
weight = e4m3(round-to-nearest(w / s)), `<layer>.weight_scale` [out, 1]; with `--comfyui_mode` one s per
tensor, `<layer>.scale_weight` and the `scaled_fp8` marker. The published file is lightx2v/Hy1.5-Distill-Models
`hy1.5_t2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors` (8.85 GB), loaded by LightX2V's `fp8-sgl` scheme
(`<layer>.weight_scale` beside each weight, `models/networks/hunyuan_video/weights`).

Not established, refused naming the file: ComfyUI's own HunyuanVideo module names (Flux-style fused
`img_attn.qkv`, `img_mod.lin`, `img_mlp.0`; compiler/detect.py refuses those in any dtype), ComfyUI's newer
per-layer `comfy_quant` / `input_scale` format, diffusers-named FP8 files and unscaled float8.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from telefuser.schema.fp8_keys import UNUSED_SUFFIXES
from telefuser.schema.plan import Fp8Layout

# (scale key, granularity, marker) -> how the file was written
ACCEPTED = {
    ("weight_scale", "per_channel", False): "LightX2V scaled_fp8_e4m3 (per output channel weight_scale)",
    ("scale_weight", "per_tensor", True): "LightX2V converter --comfyui_mode (per-tensor scale_weight, scaled_fp8 marker)",
}


def fp8_refusal(layout: Fp8Layout, key_layout: str, keys: Iterable[str]) -> Optional[str]:
    """None when `layout` is an established HunyuanVideo-1.5 FP8 layout, else the reason (a sentence fragment)."""
    if key_layout != "tencent":
        return (f"its tensors carry {key_layout}'s names; the only established FP8 HunyuanVideo-1.5 files "
                "(LightX2V's) keep Tencent's names")
    extra = sorted(k for k in keys if k.rsplit(".", 1)[-1] in UNUSED_SUFFIXES)
    if extra:
        return (f"it carries static input scales / ComfyUI quantisation descriptors (e.g. {extra[0]!r}), a format "
                "not established for HunyuanVideo-1.5")
    if (layout.scale_key, layout.granularity, layout.marker) not in ACCEPTED:
        return (f"its float8 weights have {layout.granularity.replace('_', ' ')} scales"
                f"{' (' + layout.scale_key + ')' if layout.scale_key else ''}"
                f"{' and the scaled_fp8 marker' if layout.marker else ''}: no published HunyuanVideo-1.5 file "
                "in that layout was established")
    return None
