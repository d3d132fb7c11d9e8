"""End to end against diffusers' WanPipeline: the same tiny weights, prompt, seed and schedule give the same video.

This checks the runtime's glue, not the models (their own tests compare them with
diffusers/transformers): tokenizing, trimming each prompt embedding to its length and
zero-padding it, the CPU-seeded noise, UniPC timesteps fed to the DiT, CFG, latent
de-normalisation, and the [-1, 1] -> uint8 conversion.
Tolerance: every uint8 frame value within 0.55 of diffusers' float output x 255: 0.5
for rounding to uint8, 0.05 levels for float32 differences between two implementations
(measured: 0.501).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import telefuser
from telefuser.compiler import compile_recipe
from telefuser.models.t5.umt5_keys import wan_to_hf
from telefuser.models.tiny import TINY_ARCH
from telefuser.models.wan.dit_keys import wan_to_diffusers as dit_to_diffusers
from telefuser.models.wan.vae_keys import wan_to_diffusers as vae_to_diffusers
from telefuser.schema.canonical import pretty_json

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny"
PROMPT, NEGATIVE, SEED = "a red fox running through fresh snow", "dark blurry video", 11


def diffusers_pipeline(vocab_size: int):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    dit, vae, t5 = TINY_ARCH["dit"], TINY_ARCH["vae"], TINY_ARCH["text_encoder"]
    transformer = WanTransformer3DModel(
        patch_size=tuple(dit["patch_size"]), num_attention_heads=dit["num_heads"],
        attention_head_dim=dit["dim"] // dit["num_heads"], in_channels=dit["in_dim"], out_channels=dit["out_dim"],
        text_dim=dit["text_dim"], freq_dim=dit["freq_dim"], ffn_dim=dit["ffn_dim"], num_layers=dit["num_layers"],
        cross_attn_norm=dit["cross_attn_norm"], qk_norm="rms_norm_across_heads", eps=dit["eps"])
    transformer.load_state_dict(dit_to_diffusers(load_file(str(TINY / "dit.safetensors"))), strict=True)
    autoencoder = AutoencoderKLWan(base_dim=vae["base_dim"], z_dim=vae["z_dim"], dim_mult=vae["dim_mult"],
                                   num_res_blocks=vae["num_res_blocks"], temperal_downsample=vae["temporal_downsample"])
    autoencoder.load_state_dict(vae_to_diffusers(load_file(str(TINY / "vae.safetensors"))), strict=True)
    encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=t5["dim"], d_kv=t5["dim_attn"] // t5["num_heads"], d_ff=t5["dim_ffn"],
        num_layers=t5["num_layers"], num_heads=t5["num_heads"], relative_attention_num_buckets=t5["num_buckets"],
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6))
    encoder.load_state_dict(wan_to_hf(load_file(str(TINY / "text_encoder.safetensors"))), strict=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TINY / "tokenizer.json"), pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=5.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=encoder.eval(), vae=autoencoder.eval(),
                       scheduler=scheduler, transformer=transformer.eval())


@pytest.mark.slow  # imports diffusers and runs both pipelines: ~5-9 s on a 2-core CPU
def test_tiny_plan_matches_diffusers_wan_pipeline(tmp_path):
    plan = compile_recipe(TINY.parent / "tiny.toml")
    (tmp_path / "p.json").write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    l2 = plan.layer2_inference_config
    assert (l2.sample_solver, l2.sigma_shift, l2.num_inference_steps) == ("unipc", 5.0, 4)
    ours = telefuser.load_plan(str(tmp_path / "p.json")).run(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, progress=False).frames

    vocab = plan.model("text_encoder").arch["vocab_size"]
    reference = diffusers_pipeline(vocab)(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=144, width=256, num_frames=l2.num_frames,
        num_inference_steps=l2.num_inference_steps, guidance_scale=l2.cfg_scale,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", max_sequence_length=l2.text_len,
    ).frames[0]
    assert reference.shape == ours.shape
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64) * 255)
    assert diff.max() <= 0.55, diff.max()
