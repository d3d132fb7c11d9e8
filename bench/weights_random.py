"""Random weights of the real shapes, for every benchmark: the one rule for random values (`random_value`), the one
meta-device model builder (`meta_model`, `random_model`), and files in Wan's or diffusers' / transformers' folder
layouts (`write_module`, `write_wan21_diffusers`) that TeleFuser (whose compiler reads those layouts) and the peer
load alike.

Tensors are generated one at a time on the benchmark's device from the shapes of classes built on the meta device
(no model is materialised), and shards of at most SHARD_BYTES are written as they fill, so host memory holds one
shard at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

BF16 = torch.bfloat16
SHARD_BYTES = 4 << 30
# Norm layers' weights by name where the name does not say "norm" (Wan2.1 I2V's image-embedding LayerNorms).
NORM_WEIGHTS = ("img_emb.proj.0.weight", "img_emb.proj.4.weight")


def random_value(name: str, shape: torch.Size, dtype: torch.dtype, device: str | torch.device,
                 gen: torch.Generator) -> torch.Tensor:
    """The one rule: norm gains 1 (`gamma`, a norm's weight), norm biases 0, linear and convolution weights
    N(0, 1/fan_in) (activations stay O(1) through deep stacks, so outputs compare meaningfully), everything else
    (biases, modulation tables, embeddings) N(0, 0.02)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gamma" or (leaf == "weight" and ("norm" in name or name in NORM_WEIGHTS)):
        return t.fill_(1.0)
    if leaf == "bias" and "norm" in name:
        return t.zero_()
    if leaf == "weight" and len(shape) >= 2:
        return t.normal_(0.0, math.prod(shape[1:]) ** -0.5, generator=gen)
    return t.normal_(0.0, 0.02, generator=gen)


def meta_model(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`make()` on the meta device: every tensor's name and shape, no memory, nothing initialised."""
    with torch.device("meta"):
        return make()


def random_state(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype = BF16,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A random value (`random_value`) for every persistent tensor of `module` (meta is enough), on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {name: random_value(name, t.shape, dtype, device, gen) for name, t in module.state_dict().items()}


def random_model(make: Callable[[], torch.nn.Module], device: str | torch.device, dtype: torch.dtype,
                 seed: int = 0) -> torch.nn.Module:
    """A model with random weights, built as TeleFuser's loader builds one: on meta, the tensors assigned, then
    to(device, dtype); a model that derives buffers in __init__ the meta device cannot hold is built on `device`.
    The same seed gives the same weights on every rank."""
    model = meta_model(make)
    persistent = model.state_dict().keys()
    if any(b.is_meta and name not in persistent for name, b in model.named_buffers()):
        with torch.device(device):
            model = make()
    model.load_state_dict(random_state(model, device, dtype, seed), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def wan_step_inputs(cfg, latent: tuple[int, ...], text_len: int, device: str, dtype: torch.dtype):
    """A random-weight WanDiT of `cfg` (seed 0) and one CFG step's inputs: latent x, t = 900, the two text contexts,
    drawn from a generator seeded 3 in that order, returned too for further inputs: (dit, x, t, context,
    context_null, generator)."""
    from telefuser.models.wan.dit import WanDiT

    dit = random_model(lambda: WanDiT(cfg), device, dtype, seed=0)
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(latent, generator=gen, device=device).to(dtype)
    t = torch.tensor([900.0], device=device)
    context, context_null = (torch.randn(1, text_len, cfg.text_dim, generator=gen, device=device).to(dtype)
                             for _ in range(2))
    return dit, x, t, context, context_null, gen


def write_module(module: torch.nn.Module, folder: Path, stem: str, device: str, skip: tuple[str, ...] = (),
                 convert=None) -> Path:
    """Every persistent tensor of a meta `module` (minus `skip`), random, as `folder/stem.safetensors` or
    shards `stem-0000k.safetensors` with a `stem.safetensors.index.json`; returns the file or the index.
    `convert(name, tensor) -> {name: tensor}` rewrites a tensor on its way to disk (e.g. to another layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    written = 0
    weight_map: dict[str, str] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size, written
        if shard:
            written += 1
            name = f"{stem}-{written:05d}.safetensors"
            save_file(shard, folder / name)
            weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, meta in module.state_dict().items():
        if name in skip:
            continue
        value = random_value(name, meta.shape, BF16, device, gen)
        for key, tensor in (convert(name, value) if convert else {name: value}).items():
            if size and size + tensor.nbytes > SHARD_BYTES:
                flush()
            shard[key] = tensor.contiguous().cpu()
            size += tensor.nbytes
            total += tensor.nbytes
    if not written:  # everything fitted in one shard: a plain file
        path = folder / f"{stem}.safetensors"
        save_file(shard, path)
        return path
    flush()
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def diffusers_transformer(cfg, image_dim: int | None = None):
    """diffusers' WanTransformer3DModel of a TeleFuser WanDiTConfig, on meta (config saved by the caller)."""
    from diffusers import WanTransformer3DModel

    return meta_model(lambda: WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=image_dim,
        added_kv_proj_dim=cfg.dim if image_dim else None))  # I2V: the image tokens' own k/v (official config)


def write_wan21_diffusers(root: Path, dit_cfg, vae_cfg, t5_cfg, device: str) -> dict[str, Path]:
    """transformer/, vae/, text_encoder/ (config.json + weights) and tokenizer.json under `root`; returns the
    weight paths by role. No transformer when `dit_cfg` is None. Skipped when root/done.json exists."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config as HFConfig, UMT5EncoderModel

    from telefuser.models.t5.tokenizer import build_tiny_tokenizer

    paths = {"dit": root / "transformer" / "diffusion_pytorch_model.safetensors.index.json",
             "vae": root / "vae" / "diffusion_pytorch_model.safetensors",
             "text_encoder": root / "text_encoder" / "model.safetensors", "tokenizer": root / "tokenizer.json"}
    done = root / "done.json"
    if done.is_file():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    root.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(paths["tokenizer"])
    if dit_cfg is None:
        del paths["dit"]
    else:
        transformer = diffusers_transformer(dit_cfg)
        transformer.save_config(root / "transformer")
        paths["dit"] = write_module(transformer, root / "transformer", "diffusion_pytorch_model", device)
    vae = meta_model(lambda: AutoencoderKLWan(
        base_dim=vae_cfg.base_dim, z_dim=vae_cfg.z_dim, dim_mult=list(vae_cfg.dim_mult),
        num_res_blocks=vae_cfg.num_res_blocks, temperal_downsample=list(vae_cfg.temporal_downsample)))
    vae.save_config(root / "vae")
    paths["vae"] = write_module(vae, root / "vae", "diffusion_pytorch_model", device)
    hf = HFConfig(vocab_size=t5_cfg.vocab_size, d_model=t5_cfg.dim, d_kv=t5_cfg.dim_attn // t5_cfg.num_heads,
                  d_ff=t5_cfg.dim_ffn, num_layers=t5_cfg.num_layers, num_heads=t5_cfg.num_heads,
                  relative_attention_num_buckets=t5_cfg.num_buckets, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0, torch_dtype="bfloat16")
    hf.save_pretrained(root / "text_encoder")
    encoder = meta_model(lambda: UMT5EncoderModel(hf))
    # encoder.embed_tokens is tied to shared: saved once, as save_pretrained does
    paths["text_encoder"] = write_module(encoder, root / "text_encoder", "model", device,
                                         skip=("encoder.embed_tokens.weight",))
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def write_fp8_scaled(cfg, path: Path, device: str) -> Path:
    """A Wan-layout DiT of `cfg` as the "scaled fp8" checkpoints published for Wan store it (ComfyUI / Kijai
    `*_fp8_e4m3fn_scaled`): each block linear's `.weight` in float8_e4m3fn with a float32 `.scale_weight`
    (amax / 448, one per tensor), the `scaled_fp8` marker, everything else bf16; `path` names the file (or,
    sharded, its index: returned). Skipped when it exists."""
    from telefuser.models.wan.dit import WanDiT

    stem = path.name.removesuffix(".safetensors")
    for done in (path.parent / f"{stem}.safetensors.index.json", path):
        if done.is_file():
            return done
    path.parent.mkdir(parents=True, exist_ok=True)
    model = meta_model(lambda: WanDiT(cfg))
    fp8 = torch.float8_e4m3fn

    def quantise(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        if not (name.startswith("blocks.") and name.endswith(".weight") and value.ndim == 2):
            return {name: value}
        scale = value.float().abs().amax() / 448.0
        return {name: (value.float() / scale).to(fp8), name[: -len("weight")] + "scale_weight": scale.reshape(())}

    out = write_module(model, path.parent, stem, device, convert=quantise)
    if out.suffix == ".json":  # sharded: the marker gets a file of its own in the index
        save_file({"scaled_fp8": torch.empty(0, dtype=fp8)}, path.parent / f"{stem}-marker.safetensors")
        index = json.loads(out.read_text())
        index["weight_map"]["scaled_fp8"] = f"{stem}-marker.safetensors"
        out.write_text(json.dumps(index))
    return out
