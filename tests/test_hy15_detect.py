"""HunyuanVideo-1.5 weight detection from names and shapes (both layouts; the published architectures and tiny
ones round-trip to their configs), the registry entries, and no confusion with the Wan family's files."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from telefuser.models import registry
from telefuser.models.hunyuan15 import detect, dit_keys, sr, vae_keys
from telefuser.models.hunyuan15.dit import HUNYUAN15_8B, HUNYUAN15_SR_8B, HunyuanVideo15DiT, HunyuanVideo15DiTConfig
from telefuser.models.hunyuan15.vae import HunyuanVideo15VAE, HunyuanVideo15VAEConfig

TINY_DIT = HunyuanVideo15DiTConfig(in_channels=9, out_channels=4, hidden_size=64, heads_num=2, mlp_hidden_dim=128,
                                   double_blocks=2, single_blocks=1, rope_dim_list=detect.rope_dims_for(32),
                                   text_states_dim=40, refiner_blocks=1, byt5_dim=16, byt5_hidden=32, vision_states_dim=24)
TINY_VAE = HunyuanVideo15VAEConfig(latent_channels=4, block_out_channels=[8, 16, 16], layers_per_block=1,
                                   spatial_ratio=4, temporal_ratio=2)


def shapes_of(model_class, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}


def as_dict(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@pytest.mark.parametrize("config,role", [(HUNYUAN15_8B, "base"), (HUNYUAN15_SR_8B, "sr"), (TINY_DIT, "base")],
                         ids=["published", "published-sr", "tiny"])
@pytest.mark.parametrize("layout", ["tencent", "diffusers"])
def test_dit_detected_in_both_layouts(config: HunyuanVideo15DiTConfig, role: str, layout: str) -> None:
    if layout == "diffusers" and config.single_blocks:
        config = dataclasses.replace(config, single_blocks=0)  # diffusers has no single-stream blocks
    shapes = shapes_of(HunyuanVideo15DiT, config)
    if layout == "diffusers":
        shapes = {k: tuple(v.shape) for k, v in dit_keys.tencent_to_diffusers(
            {k: torch.empty(s, device="meta") for k, s in shapes.items()}).items()}
    found = detect.detect(shapes)
    assert found is not None and found.class_name == "HunyuanVideo15DiT" and found.layout == layout
    assert found.role == role
    assert HunyuanVideo15DiTConfig(**found.arch) == config


@pytest.mark.parametrize("config", [HunyuanVideo15VAEConfig(), TINY_VAE], ids=["published", "tiny"])
@pytest.mark.parametrize("layout", ["tencent", "diffusers"])
def test_vae_detected_in_both_layouts(config: HunyuanVideo15VAEConfig, layout: str) -> None:
    shapes = shapes_of(HunyuanVideo15VAE, config)
    if layout == "diffusers":
        shapes = vae_keys.tencent_to_diffusers(shapes)
    found = detect.detect(shapes)
    assert found is not None and (found.class_name, found.layout) == ("HunyuanVideo15VAE", layout)
    assert HunyuanVideo15VAEConfig(**found.arch) == config


def test_upsamplers_detected() -> None:
    for cls, cfg, name in ((sr.SRUpsampler720p, sr.SRUpsampler720pConfig(), "HunyuanVideo15SRUpsampler720p"),
                           (sr.SRUpsampler1080p, sr.SRUpsampler1080pConfig(block_out_channels=[64, 64, 32]),
                            "HunyuanVideo15SRUpsampler1080p")):
        found = detect.detect(shapes_of(cls, cfg))
        assert found is not None and found.class_name == name
        assert type(cfg)(**found.arch) == cfg


def test_registry_builds_and_converts() -> None:
    entry = registry.get("HunyuanVideo15DiT")
    model = entry.model_class(entry.config_class(**as_dict(TINY_DIT)))
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items() if not k.startswith("single_blocks")}
    model_ds = entry.model_class(entry.config_class(**{**as_dict(TINY_DIT), "single_blocks": 0}))
    diff = dit_keys.tencent_to_diffusers(state)
    assert entry.detect_layout(diff.keys()) == "diffusers"
    model_ds.load_state_dict(entry.convert(diff, "diffusers"), strict=True)
    assert entry.own_name("transformer_blocks.1.attn.to_add_out.weight", "diffusers") == "double_blocks.1.txt_attn_proj.weight"
    vae = registry.get("HunyuanVideo15VAE")
    v = vae.model_class(vae.config_class(**as_dict(TINY_VAE)))
    vs = vae_keys.tencent_to_diffusers(v.state_dict())
    v.load_state_dict(vae.convert(vs, vae.detect_layout(vs.keys())), strict=True)
    up = registry.get("HunyuanVideo15SRUpsampler720p")
    u = up.model_class(up.config_class())
    u.load_state_dict(up.convert(u.state_dict(), up.detect_layout(u.state_dict().keys())), strict=True)


def test_wan_files_are_not_hunyuan() -> None:
    from telefuser.models.tiny import TINY_ARCH
    from telefuser.models.wan.dit import WanDiT, WanDiTConfig
    from telefuser.models.wan.dit_keys import wan_to_diffusers
    from telefuser.models.wan.vae import WanVAE, WanVAEConfig
    from telefuser.models.wan import vae_keys as wan_vae_keys

    from telefuser.models.wan import vae22_keys
    from telefuser.models.wan.vae22 import Wan22VAE, Wan22VAEConfig

    dit = shapes_of(WanDiT, WanDiTConfig(**TINY_ARCH["dit"]))
    wvae = shapes_of(WanVAE, WanVAEConfig(**TINY_ARCH["vae"]))
    w22 = shapes_of(Wan22VAE, Wan22VAEConfig(**TINY_ARCH["vae22"]))
    for shapes in (dit, wan_to_diffusers(dit), wvae, wan_vae_keys.wan_to_diffusers(wvae), w22,
                   vae22_keys.wan_to_diffusers(w22)):
        assert detect.detect(shapes) is None


def test_qwen_text_encoder_detected_in_the_hub_layout() -> None:
    from telefuser.models.hunyuan15.qwen_text import Qwen25VLTextConfig, Qwen25VLTextEncoder

    full = shapes_of(Qwen25VLTextEncoder, Qwen25VLTextConfig(skip_layers=0))  # every layer and the final norm
    hub = {"model." + k: s for k, s in full.items()} | {"lm_head.weight": (152064, 3584), "visual.merger.mlp.0.weight": (5120, 5120)}
    found = detect.detect(hub)
    assert found is not None and (found.class_name, found.layout) == ("Qwen25VLTextEncoder", "hf")
    assert Qwen25VLTextConfig(**found.arch) == Qwen25VLTextConfig()
    used = [k for k in hub if detect.qwen_text_used(k, found.arch)]
    entry = registry.get("Qwen25VLTextEncoder")
    assert set(shapes_of(entry.model_class, Qwen25VLTextConfig())) == {k[len("model."):] for k in used}
    params = sum(math.prod(hub[k]) for k in used)
    assert 6.4e9 < params < 6.7e9, params  # 26 of 28 layers and the embedding of the 7.6B language model


def test_detection_imports_no_torch() -> None:
    """The compiler loads no weights and may not need torch: the detectors and buckets import neither."""
    import subprocess
    import sys

    code = ("import sys, telefuser.models.hunyuan15.detect, telefuser.models.hunyuan15.buckets; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_used_tensors() -> None:
    found = detect.Found("SigLIPVision", "hf", {})
    assert detect.used(found, "vision_model.encoder.layers.0.mlp.fc1.weight")
    assert not detect.used(found, "vision_model.head.probe") and not detect.used(found, "text_model.x.weight")
    t5 = detect.Found("ByT5Encoder", "hf", {})
    assert detect.used(t5, "encoder.block.0.layer.0.SelfAttention.q.weight") and not detect.used(t5, "decoder.block.0.x")
    qwen = detect.Found("Qwen25VLTextEncoder", "hf", {"num_layers": 28, "skip_layers": 2})
    assert detect.used(qwen, "model.layers.25.mlp.up_proj.weight") and not detect.used(qwen, "model.layers.26.mlp.up_proj.weight")
    assert detect.used(detect.Found("HunyuanVideo15DiT", "tencent", {}), "img_in.proj.weight")
