"""The tensors of every repeated block of the models block offload can stream, from the plan's architecture numbers
alone (no weights loaded), so the compiler sizes the streamed groups exactly as the runtime packs them.

One function per model class (the compiler imports no model code); each is checked against the class built on the
meta device by tests/test_block_offload.py and tests/test_encoder_streaming.py. Blocks are listed in run order, as
the model class's `BLOCK_LISTS` concatenates them (runtime/memory/block_offload.py `model_blocks`).
"""

from __future__ import annotations

from typing import Callable

# (name, shape, kind); kind "linear" (an nn.Linear weight, quantised by quant_config), "bias" (its bias) or "other"
Tensor = tuple[str, tuple[int, ...], str]


def _linear(name: str, n_in: int, n_out: int, bias: bool = True) -> list[Tensor]:
    out = [(f"{name}.weight", (n_out, n_in), "linear")]
    return out + [(f"{name}.bias", (n_out,), "bias")] if bias else out


def wan_block_tensors(arch: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of one WanBlock, as telefuser.models.wan.dit builds it."""
    return [(name, shape) for name, shape, _ in _wan_block(arch)]


def _wan_block(arch: dict) -> list[Tensor]:
    dim, ffn = int(arch["dim"]), int(arch["ffn_dim"])
    qk_norm, image = bool(arch.get("qk_norm", True)), arch.get("model_type", "t2v") == "i2v"
    tensors: list[Tensor] = []
    for attn in ("self_attn", "cross_attn"):
        for proj in ("q", "k", "v", "o"):
            tensors += _linear(f"{attn}.{proj}", dim, dim)
        if qk_norm:
            tensors += [(f"{attn}.norm_q.weight", (dim,), "other"), (f"{attn}.norm_k.weight", (dim,), "other")]
    if image:
        tensors += _linear("cross_attn.k_img", dim, dim) + _linear("cross_attn.v_img", dim, dim)
        if qk_norm:
            tensors.append(("cross_attn.norm_k_img.weight", (dim,), "other"))
    if arch.get("cross_attn_norm", True):
        tensors += [("norm3.weight", (dim,), "other"), ("norm3.bias", (dim,), "other")]
    tensors += _linear("ffn.0", dim, ffn) + _linear("ffn.2", ffn, dim)
    tensors.append(("modulation", (1, 6, dim), "other"))
    return tensors


def _wan(arch: dict) -> list[list[Tensor]]:
    return [_wan_block(arch)] * int(arch["num_layers"])


def _umt5(arch: dict) -> list[list[Tensor]]:
    """telefuser.models.t5.umt5.T5Block (umT5-XXL)."""
    dim, attn, ffn = int(arch["dim"]), int(arch["dim_attn"]), int(arch["dim_ffn"])
    block = [("norm1.weight", (dim,), "other"), ("norm2.weight", (dim,), "other")]
    for proj in ("q", "k", "v"):
        block += _linear(f"attn.{proj}", dim, attn, bias=False)
    block += _linear("attn.o", attn, dim, bias=False)
    block += _linear("ffn.gate.0", dim, ffn, bias=False) + _linear("ffn.fc1", dim, ffn, bias=False)
    block += _linear("ffn.fc2", ffn, dim, bias=False)
    if not arch.get("shared_pos", False):
        block.append(("pos_embedding.embedding.weight", (int(arch["num_buckets"]), int(arch["num_heads"])), "other"))
    return [block] * int(arch["num_layers"])


def _qwen25vl(arch: dict) -> list[list[Tensor]]:
    """telefuser.models.hunyuan15.qwen_text.DecoderLayer, for the layers run (num_layers - skip_layers)."""
    h, mlp = int(arch["hidden_size"]), int(arch["intermediate_size"])
    heads, kv = int(arch["num_heads"]), int(arch["num_kv_heads"])
    d = h // heads
    block = [("input_layernorm.weight", (h,), "other"), ("post_attention_layernorm.weight", (h,), "other")]
    block += _linear("self_attn.q_proj", h, heads * d) + _linear("self_attn.k_proj", h, kv * d)
    block += _linear("self_attn.v_proj", h, kv * d) + _linear("self_attn.o_proj", heads * d, h, bias=False)
    block += _linear("mlp.gate_proj", h, mlp, bias=False) + _linear("mlp.up_proj", h, mlp, bias=False)
    block += _linear("mlp.down_proj", mlp, h, bias=False)
    return [block] * (int(arch["num_layers"]) - int(arch.get("skip_layers", 2)))


def _hunyuan15_dit(arch: dict) -> list[list[Tensor]]:
    """telefuser.models.hunyuan15.dit_layers.DoubleStreamBlock x double_blocks, then SingleStreamBlock x
    single_blocks."""
    h, mlp = int(arch["hidden_size"]), int(arch["mlp_hidden_dim"])
    d = h // int(arch["heads_num"])
    double: list[Tensor] = []
    for s in ("img", "txt"):
        double += _linear(f"{s}_mod.linear", h, 6 * h)
        for proj in ("q", "k", "v"):
            double += _linear(f"{s}_attn_{proj}", h, h)
        double += [(f"{s}_attn_q_norm.weight", (d,), "other"), (f"{s}_attn_k_norm.weight", (d,), "other")]
        double += _linear(f"{s}_attn_proj", h, h) + _linear(f"{s}_mlp.fc1", h, mlp) + _linear(f"{s}_mlp.fc2", mlp, h)
    single = _linear("linear1_q", h, h) + _linear("linear1_k", h, h) + _linear("linear1_v", h, h)
    single += _linear("linear1_mlp", h, mlp) + _linear("linear2.fc", h + mlp, h)
    single += [("q_norm.weight", (d,), "other"), ("k_norm.weight", (d,), "other")]
    single += _linear("modulation.linear", h, 3 * h)
    return [double] * int(arch.get("double_blocks", 0)) + [single] * int(arch.get("single_blocks", 0))


# plan class name -> its blocks; a class not here is not streamed (compiler/block_offload.py refuses it, naming these)
BLOCKS: dict[str, Callable[[dict], list[list[Tensor]]]] = {
    "WanDiT": _wan, "HunyuanVideo15DiT": _hunyuan15_dit, "UMT5Encoder": _umt5,
    "Qwen25VLTextEncoder": _qwen25vl,
}


def block_tensors(class_name: str, arch: dict) -> list[list[Tensor]]:
    """Every block's tensors, in run order."""
    return BLOCKS[class_name](arch)
