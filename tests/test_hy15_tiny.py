"""The tiny HunyuanVideo-1.5 weights: deterministic, in Tencent's layout (detected as such, with the tiny arch),
and a CPU run through them: T2V and I2V DiT steps, SR conditioning and an SR DiT step, VAE encode and decode."""

from __future__ import annotations

import hashlib

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from telefuser.models import registry
from tokenizers import Tokenizer

from telefuser.models.hunyuan15 import detect, sr, text, tiny
from telefuser.models.hunyuan15.dit import condition_latents


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


LAYOUTS = {"text_encoder": "hf", "byt5": "hf", "image_encoder": "hf"}  # the others: Tencent's


def _build(role: str, path):
    entry = registry.get(tiny.CLASSES[role])
    state = load_file(str(path))
    layout = LAYOUTS.get(role, "tencent")
    assert entry.detect_layout(state.keys()) == layout
    model = entry.model_class(entry.config_class(**tiny.TINY_ARCH[role])).eval()
    model.load_state_dict(entry.convert(state, layout), strict=True)
    return model


def test_tiny_files_are_deterministic_and_detected(tmp_path) -> None:
    first = tiny.generate(tmp_path / "a")
    second = tiny.generate(tmp_path / "b")
    for role, path in first.items():
        assert _sha(path) == _sha(second[role]), role
        if role == "tokenizer":
            continue
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        found = detect.detect(shapes)
        assert found is not None and found.class_name == tiny.CLASSES[role]
        assert found.layout == LAYOUTS.get(role, "tencent") and found.arch == tiny.TINY_ARCH[role], role
    assert detect.detect_dit({k: tuple(v.shape) for k, v in load_file(str(first["dit_sr"])).items()}).role == "sr"
    assert sum(p.stat().st_size for p in first.values()) < 16 * 2**20


def test_tiny_t2v_i2v_sr_run(tmp_path) -> None:
    files = tiny.generate(tmp_path)
    dit, dit_i2v, dit_sr = (_build(r, files[r]) for r in ("dit", "dit_i2v", "dit_sr"))
    vae, up = _build("vae", files["vae"]), _build("upsampler_720p", files["upsampler_720p"])
    qwen, byt5 = _build("text_encoder", files["text_encoder"]), _build("byt5", files["byt5"])
    siglip = _build("image_encoder", files["image_encoder"])
    gen = torch.Generator().manual_seed(0)
    tokenizer = Tokenizer.from_file(str(files["tokenizer"]))
    prompt = 'A cat holds a sign that says "HELLO"'
    ids, ids_mask, crop = text.tokenize_rendered(lambda s: tokenizer.encode(s).ids, [prompt],
                                                 tokenizer.token_to_id("<|endoftext|>"), max_length=96)
    with torch.no_grad():
        states = qwen(ids, ids_mask)[:, crop:]
        mask = ids_mask[:, crop:]
        glyph_ids, glyph_mask = text.byt5_ids(text.glyph_text(prompt), 32)
        glyph = byt5(glyph_ids, glyph_mask)
    assert states.shape == (1, 96, 256) and 0 < mask.sum() < 96 and glyph.shape == (1, 32, 16)
    text_states = states
    latents = torch.randn(1, tiny.LATENT, 2, 4, 4, generator=gen)  # 5 frames of 64 x 64
    with torch.no_grad():
        v = dit(latents, torch.tensor([1000.0]), text_states, mask, glyph, glyph_mask, y=condition_latents(latents))
        x = latents - v  # one Euler step to sigma 0
        image = torch.rand(1, 3, 1, 64, 64, generator=gen) * 2 - 1
        image_latent = vae.encode(image)
        vision = siglip(siglip.preprocess(image[:, :, 0]))
        v_i2v = dit_i2v(latents, torch.tensor([500.0]), text_states, mask, vision_states=vision,
                        y=condition_latents(latents, image_latent))
        size = (6, 6)  # 1.5x per side, as 480p -> 720p
        lq = sr.noise_lq_latent(sr.upsample_lq_latent(x, size, up), 0.7, generator=gen)
        hr = torch.randn(1, tiny.LATENT, 2, *size, generator=gen)
        condition, zero = sr.sr_condition(hr, lq)
        v_sr = dit_sr(hr, torch.tensor([900.0]), text_states, mask, glyph, glyph_mask,
                      y=sr.sr_condition_for(900.0, condition, zero),
                      t_r=torch.tensor([600.0]))
        video = vae.decode(hr - v_sr, tiled=True, tile_size=(4, 4))
    assert image_latent.shape == (1, tiny.LATENT, 1, 4, 4) and vision.shape == (1, 4, 144)
    assert v.shape == v_i2v.shape == latents.shape and v_sr.shape == hr.shape
    assert video.shape == (1, 3, 5, 96, 96) and video.abs().max() <= 1.0
    assert all(torch.isfinite(t).all() for t in (v, v_i2v, v_sr, video))


def test_tiny_files_load_into_models_built_on_meta(tmp_path) -> None:
    """As the runtime loads: the model built on the meta device, the converted state assigned (strict)."""
    for role, path in tiny.generate(tmp_path).items():
        if role == "tokenizer":
            continue
        entry = registry.get(tiny.CLASSES[role])
        state = load_file(str(path))
        with torch.device("meta"):
            model = entry.model_class(entry.config_class(**tiny.TINY_ARCH[role]))
        model.load_state_dict(entry.convert(state, entry.detect_layout(state.keys())), strict=True, assign=True)
        assert not any(p.is_meta for p in model.parameters()), role
        assert not any(b.is_meta for b in model.buffers()), role
