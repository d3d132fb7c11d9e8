"""HunyuanVideo-1.5 DiT key layouts: Tencent's own (canonical here, `HunyuanVideo_1_5_DiffusionTransformer`) and
diffusers' `HunyuanVideo15Transformer3DModel` (the hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-* files).

Most tensors are renamed only. Two differ in value, as diffusers' conversion script makes them:
- the token refiner's fused `self_attn_qkv` (Tencent) is three tensors `attn.to_q/to_k/to_v` (diffusers), split in
  (q, k, v) order along the output dim;
- the final adaLN linear is (shift, scale) in Tencent's order and (scale, shift) in diffusers'
  `norm_out.linear` (AdaLayerNormContinuous): its two output halves are swapped.
diffusers has no single-stream blocks and no guidance embedder (no published 1.5 checkpoint has them either).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_REFINER_T = "txt_in.individual_token_refiner.blocks.{i}."
_REFINER_D = "context_embedder.token_refiner.refiner_blocks.{i}."
# (Tencent prefix, diffusers prefix); `{i}` stands for a block index.
_PREFIX_PAIRS: list[tuple[str, str]] = [
    ("img_in.proj.", "x_embedder.proj."),
    ("time_in.mlp.0.", "time_embed.timestep_embedder.linear_1."),
    ("time_in.mlp.2.", "time_embed.timestep_embedder.linear_2."),
    ("time_r_in.mlp.0.", "time_embed.timestep_embedder_r.linear_1."),
    ("time_r_in.mlp.2.", "time_embed.timestep_embedder_r.linear_2."),
    ("txt_in.t_embedder.mlp.0.", "context_embedder.time_text_embed.timestep_embedder.linear_1."),
    ("txt_in.t_embedder.mlp.2.", "context_embedder.time_text_embed.timestep_embedder.linear_2."),
    ("txt_in.c_embedder.linear_1.", "context_embedder.time_text_embed.text_embedder.linear_1."),
    ("txt_in.c_embedder.linear_2.", "context_embedder.time_text_embed.text_embedder.linear_2."),
    ("txt_in.input_embedder.", "context_embedder.proj_in."),
    (_REFINER_T + "norm1.", _REFINER_D + "norm1."),
    (_REFINER_T + "norm2.", _REFINER_D + "norm2."),
    (_REFINER_T + "self_attn_proj.", _REFINER_D + "attn.to_out.0."),
    (_REFINER_T + "mlp.fc1.", _REFINER_D + "ff.net.0.proj."),
    (_REFINER_T + "mlp.fc2.", _REFINER_D + "ff.net.2."),
    (_REFINER_T + "adaLN_modulation.1.", _REFINER_D + "norm_out.linear."),
    ("byt5_in.layernorm.", "context_embedder_2.norm."),
    ("byt5_in.fc1.", "context_embedder_2.linear_1."),
    ("byt5_in.fc2.", "context_embedder_2.linear_2."),
    ("byt5_in.fc3.", "context_embedder_2.linear_3."),
    ("vision_in.proj.0.", "image_embedder.norm_in."),
    ("vision_in.proj.1.", "image_embedder.linear_1."),
    ("vision_in.proj.3.", "image_embedder.linear_2."),
    ("vision_in.proj.4.", "image_embedder.norm_out."),
    ("cond_type_embedding.", "cond_type_embed."),
    ("double_blocks.{i}.img_mod.linear.", "transformer_blocks.{i}.norm1.linear."),
    ("double_blocks.{i}.txt_mod.linear.", "transformer_blocks.{i}.norm1_context.linear."),
    ("double_blocks.{i}.img_attn_q.", "transformer_blocks.{i}.attn.to_q."),
    ("double_blocks.{i}.img_attn_k.", "transformer_blocks.{i}.attn.to_k."),
    ("double_blocks.{i}.img_attn_v.", "transformer_blocks.{i}.attn.to_v."),
    ("double_blocks.{i}.img_attn_q_norm.", "transformer_blocks.{i}.attn.norm_q."),
    ("double_blocks.{i}.img_attn_k_norm.", "transformer_blocks.{i}.attn.norm_k."),
    ("double_blocks.{i}.img_attn_proj.", "transformer_blocks.{i}.attn.to_out.0."),
    ("double_blocks.{i}.txt_attn_q.", "transformer_blocks.{i}.attn.add_q_proj."),
    ("double_blocks.{i}.txt_attn_k.", "transformer_blocks.{i}.attn.add_k_proj."),
    ("double_blocks.{i}.txt_attn_v.", "transformer_blocks.{i}.attn.add_v_proj."),
    ("double_blocks.{i}.txt_attn_q_norm.", "transformer_blocks.{i}.attn.norm_added_q."),
    ("double_blocks.{i}.txt_attn_k_norm.", "transformer_blocks.{i}.attn.norm_added_k."),
    ("double_blocks.{i}.txt_attn_proj.", "transformer_blocks.{i}.attn.to_add_out."),
    ("double_blocks.{i}.img_mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("double_blocks.{i}.img_mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
    ("double_blocks.{i}.txt_mlp.fc1.", "transformer_blocks.{i}.ff_context.net.0.proj."),
    ("double_blocks.{i}.txt_mlp.fc2.", "transformer_blocks.{i}.ff_context.net.2."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),  # + the (shift, scale) <-> (scale, shift) swap
]
_QKV_T = re.compile(r"^txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_qkv\.(weight|bias)$")
_QKV_D = re.compile(r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_([qkv])\.(weight|bias)$")
_FINAL_ADALN = ("final_layer.adaLN_modulation.1.", "norm_out.linear.")


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(\d+)"))


_TO_DIFFUSERS = [(_compile(t), d) for t, d in _PREFIX_PAIRS]
_TO_TENCENT = [(_compile(d), t) for t, d in _PREFIX_PAIRS]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            return (target.replace("{i}", m.group(1)) if m.groups() else target) + key[m.end():]
    return key


def _swap_halves(t: Any) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def tencent_to_diffusers(state: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = _QKV_T.match(key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"context_embedder.token_refiner.refiner_blocks.{m.group(1)}.attn.to_{name}.{m.group(2)}"] = part
            continue
        if key.startswith(_FINAL_ADALN[0]):
            value = _swap_halves(value)
        out[_rename(key, _TO_DIFFUSERS)] = value
    return out


def diffusers_to_tencent(state: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in state.items():
        m = _QKV_D.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        if key.startswith(_FINAL_ADALN[1]):
            value = _swap_halves(value)
        out[_rename(key, _TO_TENCENT)] = value
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"refiner block {i}'s attention {kind} lacks to_{'/to_'.join(sorted({'q', 'k', 'v'} - set(parts)))}")
        out[f"txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv.{kind}"] = torch.cat([parts[c] for c in "qkv"], 0)
    return out


def detect_layout(keys: Iterable[str]) -> str:
    """'tencent' or 'diffusers', from the keys of a HunyuanVideo-1.5 DiT state dict."""
    keys = list(keys)
    if any(k.startswith("double_blocks.") or k.startswith("txt_in.") for k in keys):
        return "tencent"
    if any(k.startswith("transformer_blocks.") and ".attn.add_q_proj." in k for k in keys) or any(
            k.startswith("context_embedder.token_refiner.") for k in keys):
        return "diffusers"
    raise ValueError("these keys are neither Tencent's nor diffusers' HunyuanVideo-1.5 DiT layout "
                     "(no double_blocks/txt_in, no transformer_blocks/context_embedder.token_refiner)")


def to_tencent_layout(state: Mapping[str, Any]) -> dict[str, Any]:
    """Any supported layout -> Tencent's own (the model's parameter names)."""
    return dict(state) if detect_layout(state.keys()) == "tencent" else diffusers_to_tencent(state)


# The registry's contract name (docs/contracts.md: each keys module converts to its canonical official layout).
to_wan_layout = to_tencent_layout


def from_layout(state: Mapping[str, T], layout: str) -> dict[str, T]:
    """Key names in `layout` -> Tencent's, renames only (a LoRA's target names): the refiner's to_q/to_k/to_v,
    which Tencent fuses, keep their diffusers names (a LoRA on them is placed by `lora_rows`)."""
    if layout == "tencent":
        return dict(state)
    return {(_rename(k, _TO_TENCENT) if not _QKV_D.match(k) else k): v for k, v in state.items()}



_LORA_QKV_D = re.compile(r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_([qkv])$")


def lora_rows(module: str, out: int) -> tuple[str, tuple[tuple[int, int, int], ...]] | None:
    """A LoRA module in diffusers' names whose rows are not one Tencent tensor's: the refiner's to_q/to_k/to_v are
    rows [0, h), [h, 2h), [2h, 3h) of Tencent's fused `self_attn_qkv` (each keeps its own low-rank pair), and the
    final `norm_out.linear` (scale, shift) is Tencent's `final_layer.adaLN_modulation.1` (shift, scale): its two
    halves swapped. (Tencent module, (source start, source stop, target start) row segments), else None."""
    m = _LORA_QKV_D.match(module)
    if m:
        return (f"txt_in.individual_token_refiner.blocks.{m.group(1)}.self_attn_qkv",
                ((0, out, "qkv".index(m.group(2)) * out),))
    if module == _FINAL_ADALN[1].rstrip(".") and out % 2 == 0:
        half = out // 2
        return _FINAL_ADALN[0].rstrip("."), ((0, half, half), (half, out, 0))
    return None
