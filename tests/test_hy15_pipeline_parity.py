"""The HunyuanVideo-1.5 model pieces composed into T2V and I2V runs (prompt -> Qwen2.5-VL / byT5 text states,
image -> VAE latent + SigLIP tokens -> CFG flow-matching Euler loop of the DiT -> VAE decode), all TeleFuser
modules, against diffusers' HunyuanVideo15Pipeline / HunyuanVideo15ImageToVideoPipeline on the same tiny random
weights, latents, prompts and image. The loop here is a few lines standing in for the runtime's
stages (which the integrator builds): it fixes what those stages must compute.

Tolerance on the frames in [0, 1]: 1e-5 relative, with diffusers' float32 time angles (as in test_hy15_dit) and
the schedule in float32 as diffusers' scheduler keeps it; float32 everywhere; measured 1.9e-6 (T2V) and 9.7e-7
(I2V), the rest of float32 rounding along the way. With float64 time angles or schedule, t = 1000 sigma differs by up to an ulp of
1000 (6e-5), which the time embedding's highest frequency turns into 6e-5 rad and 3 CFG steps of scale 6 into
~1e-5 of the frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from telefuser.models import registry
from telefuser.models.hunyuan15 import text
from telefuser.models.hunyuan15.byt5_keys import to_umt5_layout
from telefuser.models.hunyuan15.dit import HunyuanVideo15DiT, HunyuanVideo15DiTConfig, condition_latents
from telefuser.models.hunyuan15.dit_keys import diffusers_to_tencent
from telefuser.models.hunyuan15.qwen_text import Qwen25VLTextConfig, Qwen25VLTextEncoder
from telefuser.models.hunyuan15.qwen_text_keys import to_text_layout
from telefuser.models.hunyuan15.vae import HunyuanVideo15VAE, HunyuanVideo15VAEConfig
from telefuser.models.hunyuan15.vae_keys import diffusers_to_tencent as vae_to_tencent

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel  # noqa: E402

from test_hy15_text import byte_tokenizer  # noqa: E402

STEPS, SHIFT, CFG, MAX_LEN, BYT5_LEN = 3, 5.0, 6.0, 24, 32
PROMPT, NEGATIVE = 'A red "STOP" sign in the rain', "blurry"


def _float32_angles(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _randomize(module: torch.nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith(("gamma", "norm.weight", "layernorm.weight")) else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * scale)


def _models(in_channels: int = 9, vision_dim: int = 24, target_size: int = 640):
    torch.manual_seed(0)
    qtok, btok = byte_tokenizer(), ByT5Tokenizer()
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(qtok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, pad_token_id=qtok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]})).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_kv=8, num_heads=2, num_layers=2, d_ff=32,
                                 feed_forward_proj="gated-gelu")).eval()
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        mlp_ratio=4.0, text_embed_dim=32, text_embed_2_dim=16, image_embed_dim=vision_dim, rope_axes_dim=(4, 14, 14),
        target_size=target_size).eval()
    _randomize(transformer, 1, 0.1)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=2).eval()
    _randomize(vae, 2, 0.1)
    common = dict(text_encoder=qwen, tokenizer=qtok, transformer=transformer, vae=vae,
                  scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=t5, tokenizer_2=btok,
                  guider=ClassifierFreeGuidance(guidance_scale=CFG))

    # TeleFuser's modules with the same weights
    q = Qwen25VLTextEncoder(Qwen25VLTextConfig(vocab_size=len(qtok), hidden_size=32, intermediate_size=64,
                                               num_layers=3, num_heads=4, num_kv_heads=2)).eval()
    q.load_state_dict(to_text_layout(qwen.state_dict()), strict=True)
    byt5_entry = registry.get("ByT5Encoder")
    byt5 = byt5_entry.model_class(byt5_entry.config_class(vocab_size=384, dim=16, dim_attn=16, dim_ffn=32, num_heads=2,
                                                          num_layers=2, num_buckets=32, shared_pos=True)).eval()
    byt5.load_state_dict(to_umt5_layout(t5.state_dict()), strict=True)
    dit = HunyuanVideo15DiT(HunyuanVideo15DiTConfig(
        in_channels=in_channels, out_channels=4, hidden_size=64, heads_num=2, mlp_hidden_dim=256, double_blocks=2,
        rope_dim_list=[4, 14, 14], text_states_dim=32, byt5_dim=16, byt5_hidden=2048, vision_states_dim=vision_dim)).eval()
    dit.load_state_dict(diffusers_to_tencent(transformer.state_dict()), strict=True)
    our_vae = HunyuanVideo15VAE(HunyuanVideo15VAEConfig(latent_channels=4, block_out_channels=[8, 16, 16],
                                                        layers_per_block=1, spatial_ratio=4, temporal_ratio=2)).eval()
    our_vae.load_state_dict(vae_to_tencent(vae.state_dict()), strict=True)
    return common, qtok, (q, byt5, dit, our_vae)


def _pipe_setup(pipe, qtok) -> None:
    pipe.prompt_template_encode_start_idx = text.crop_start(qtok)
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = MAX_LEN, BYT5_LEN


def _our_run(ours, qtok, latents, y, vision=None):
    """The stages' computation: text states, the CFG flow-matching Euler loop, the decode; frames in [0, 1]."""
    q, byt5, dit, vae = ours

    def encode(prompt: str):
        states, mask = text.encode_text(q, qtok, [prompt], max_length=MAX_LEN)
        glyph = text.glyph_text(prompt)
        if glyph is None:
            return states, mask, None, None
        ids, gmask = text.byt5_ids(glyph, BYT5_LEN)
        return states, mask, byt5(ids, gmask), gmask

    with torch.no_grad():
        cond, uncond = encode(PROMPT), encode(NEGATIVE)
        # the flow-matching schedule with shift, in float32 as the solver keeps it: t = 1000 sigma
        sigmas = np.linspace(1.0, 0.0, STEPS + 1)[:-1].astype(np.float32)
        sigmas = torch.cat([torch.from_numpy(SHIFT * sigmas / (1 + (SHIFT - 1) * sigmas)), torch.zeros(1)])
        x = latents.clone()
        for i in range(STEPS):
            t = (sigmas[i] * 1000.0).reshape(1)
            v_c = dit(x, t, cond[0], cond[1], cond[2], cond[3], vision, y=y)
            v_u = dit(x, t, uncond[0], uncond[1], uncond[2], uncond[3], vision, y=y)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + CFG * (v_c - v_u))
        return ((vae.decode(x) + 1) / 2).clamp(0, 1)


def _rel(got, expected) -> float:
    expected = expected.permute(0, 2, 1, 3, 4) if expected.shape[1] != 3 else expected
    assert got.shape == expected.shape
    return ((got - expected).norm() / expected.norm()).item()


def test_t2v_frames_match_diffusers_pipeline(monkeypatch) -> None:
    from telefuser.models.hunyuan15 import dit_layers as dit_module  # where the time embedder looks it up

    monkeypatch.setattr(dit_module, "timestep_embedding", _float32_angles)
    common, qtok, ours = _models()
    pipe = HunyuanVideo15Pipeline(**common)
    _pipe_setup(pipe, qtok)
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=16, width=24, num_frames=5,
                        num_inference_steps=STEPS, latents=latents.clone(), output_type="pt").frames
    got = _our_run(ours, qtok, latents, condition_latents(latents))
    assert got.shape == (1, 3, 5, 16, 24)
    err = _rel(got, expected)
    assert err < 1e-5, err


def test_i2v_frames_match_diffusers_pipeline(monkeypatch) -> None:
    """I2V: the image's VAE latent at frame 0 with its mask, and SigLIP's tokens of it (TeleFuser's SigLIP), in
    both CFG branches. A 24 x 24 image, already the video's bucket and SigLIP's size, so no resize happens on
    either side (PIL's and torch's resizes differ)."""
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from telefuser.models.hunyuan15 import dit_layers as dit_module  # where the time embedder looks it up
    from telefuser.models.hunyuan15.siglip import SigLIPVisionConfig, SigLIPVisionEncoder
    from telefuser.models.hunyuan15.siglip_keys import to_vision_layout

    monkeypatch.setattr(dit_module, "timestep_embedding", _float32_angles)
    common, qtok, ours = _models(vision_dim=144, target_size=24)
    siglip_ref = SiglipVisionModel(SiglipVisionConfig(hidden_size=144, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=2, image_size=24, patch_size=12)).eval()
    processor = SiglipImageProcessor(size={"height": 24, "width": 24})
    pipe = HunyuanVideo15ImageToVideoPipeline(**common, image_encoder=siglip_ref, feature_extractor=processor)
    _pipe_setup(pipe, qtok)
    pixels = np.random.default_rng(4).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    latents = torch.randn(1, 4, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = pipe(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=5, num_inference_steps=STEPS,
                        latents=latents.clone(), output_type="pt").frames

    siglip = SigLIPVisionEncoder(SigLIPVisionConfig(image_size=24, patch_size=12, dim=144, mlp_dim=64, num_heads=2,
                                                    num_layers=2)).eval()
    siglip.load_state_dict(to_vision_layout(siglip_ref.state_dict()), strict=True)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1  # [-1, 1]
    with torch.no_grad():
        vision = siglip(siglip.preprocess(x))
        image_latent = ours[3].encode(x[:, :, None])
    got = _our_run(ours, qtok, latents, condition_latents(latents, image_latent), vision)
    assert got.shape == (1, 3, 5, 24, 24)
    err = _rel(got, expected)
    assert err < 1e-5, err
