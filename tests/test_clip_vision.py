"""CLIP vision encoder against transformers' CLIPVisionModel; preprocessing; key layouts; ViT-H/14 numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from telefuser.models.clip.vision import (VIT_H_14, ClipVisionConfig, ClipVisionEncoder, num_layers_run,
                                          preprocess)
from telefuser.models.clip.vision_keys import detect_layout, hf_to_wan, open_clip_to_wan, to_wan_layout, wan_to_hf

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel  # noqa: E402
from transformers import CLIPVisionModelWithProjection  # noqa: E402
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

# 28 px / 14 px patches -> 2 x 2 patches + class token = 5 tokens; 3 layers so the penultimate is not the first.
TINY = ClipVisionConfig(image_size=28, patch_size=14, dim=64, mlp_dim=256, num_heads=4, num_layers=3)


def hf_config(cfg: ClipVisionConfig, **extra) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim, num_attention_heads=cfg.num_heads,
                            num_hidden_layers=cfg.num_layers, image_size=cfg.image_size, patch_size=cfg.patch_size,
                            hidden_act=cfg.activation, layer_norm_eps=cfg.eps, attention_dropout=0.0, **extra)


def randomize(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    # Weights of scale 0.3 (not the near-identity init) so every term of every block matters.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected.float()).norm() / expected.float().norm())


def pixels(gen: torch.Generator, batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=gen) * 2 - 1


def reference_input(pix: torch.Tensor, size: int) -> torch.Tensor:
    """Wan's preprocessing written out, with transformers' copy of CLIP's mean/std (an independent source)."""
    x = F.interpolate(pix, size=(size, size), mode="bicubic", align_corners=False) * 0.5 + 0.5
    return (x - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]


def ours_from_hf(ref: torch.nn.Module, cfg: ClipVisionConfig) -> ClipVisionEncoder:
    ours = ClipVisionEncoder(cfg).eval()
    ours.load_state_dict(to_wan_layout(ref.state_dict()))  # strict
    return ours


# Relative Frobenius error, fp32 on both sides. Both run the same float32 ops (SDPA attention,
# float32 LayerNorm, exact GELU), so on one CPU the outputs are bit-identical (error 0 over 20 seeds);
# 1e-4 leaves room for summation-order differences elsewhere (other BLAS builds, thread counts: ~1e-6
# over three blocks) and stays 10x or more below what a real difference gives, measured over 40
# seeds: quick_gelu for gelu >= 7e-3, q and k swapped in to_qkv >= 2.6e-2, one block too many
# >= 0.49 (test_tolerance_separates_wrong_models checks each against 10 x TOL).
TOL = 1e-4


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_penultimate_features_match_clip_vision_model(activation: str) -> None:
    cfg = ClipVisionConfig(**{**TINY.__dict__, "activation": activation})
    gen = fresh_generator()
    # WithProjection: keys under vision_model. plus visual_projection, as diffusers' Wan I2V image_encoder.
    ref = randomize(CLIPVisionModelWithProjection(hf_config(cfg, projection_dim=32)), gen)
    ours = ours_from_hf(ref, cfg)
    pix = pixels(gen, 3, 45, 37)  # not square, not 28: the resize is part of what is compared
    with torch.no_grad():
        out = ours(pix)
        expected = ref(pixel_values=reference_input(pix, cfg.image_size), output_hidden_states=True).hidden_states[-2]
    assert out.shape == (3, cfg.num_tokens, cfg.dim) == (3, 5, 64)
    assert rel_err(out, expected) < TOL


def test_every_depth_matches_hidden_states() -> None:
    # hidden_states[n] is the output of n blocks (0: pre-layernorm's); pins the block count Wan runs.
    gen = fresh_generator()
    ref = randomize(CLIPVisionModel(hf_config(TINY)), gen)  # transformers >= 5: keys without vision_model.
    ours = ours_from_hf(ref, TINY)
    x = reference_input(pixels(gen, 2, 28, 28), TINY.image_size)
    with torch.no_grad():
        hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states
        for n in range(TINY.num_layers + 1):
            assert rel_err(ours.visual(x, n), hidden[n]) < TOL, n
    assert num_layers_run(TINY) == TINY.num_layers - 1 and num_layers_run(VIT_H_14) == 31


def test_tolerance_separates_wrong_models() -> None:
    gen = fresh_generator()
    ref = randomize(CLIPVisionModel(hf_config(TINY)), gen)
    x = reference_input(pixels(gen, 2, 28, 28), TINY.image_size)
    with torch.no_grad():
        hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states
        wrong_act = ClipVisionEncoder(ClipVisionConfig(**{**TINY.__dict__, "activation": "quick_gelu"})).eval()
        wrong_act.load_state_dict(to_wan_layout(ref.state_dict()))
        right = ours_from_hf(ref, TINY)
        assert rel_err(wrong_act.visual(x, 2), hidden[2]) > 10 * TOL
        assert rel_err(right.visual(x, 3), hidden[2]) > 10 * TOL  # the last block instead of the penultimate
        state = right.state_dict()
        w = state["visual.transformer.0.attn.to_qkv.weight"]
        state["visual.transformer.0.attn.to_qkv.weight"] = torch.cat([w[64:128], w[:64], w[128:]])  # k, q, v
        right.load_state_dict(state)
        assert rel_err(right.visual(x, 2), hidden[2]) > 10 * TOL


def test_preprocessing_is_wans() -> None:
    gen = fresh_generator()
    pix = pixels(gen, 2, 480, 832)
    x = preprocess(pix, 224)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x, reference_input(pix, 224), rtol=0, atol=1e-6)
    same = pixels(gen, 1, 224, 224)  # bicubic at the same size is the identity: only the normalisation acts
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    expected = (same * 0.5 + 0.5 - mean) / std
    assert torch.allclose(preprocess(same, 224), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="float pixels"):
        preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 224)
    with pytest.raises(ValueError, match="takes 28 x 28"):
        ClipVisionEncoder(TINY).visual(torch.zeros(1, 3, 32, 32))


def test_bf16_tracks_fp32() -> None:
    gen = fresh_generator()
    model = randomize(ClipVisionEncoder(TINY), gen)
    pix = pixels(gen, 2, 40, 40)
    with torch.no_grad():
        ref = model(pix)
        out = model.to(torch.bfloat16)(pix)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 keeps 8 mantissa bits (2^-9 ~ 2e-3 per op); two blocks of matmuls, softmax and norms compound
    # that to ~1e-2. 5e-2 still catches a broken bf16 path (dtype mismatches, fp32-only casts) giving O(1).
    assert rel_err(out, ref) < 5e-2


def wan_checkpoint(cfg: ClipVisionConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Our module's tensors plus what else Wan's CLIP .pth holds: the projection head, the text tower, log_scale."""
    state = randomize(ClipVisionEncoder(cfg), gen).state_dict()
    return {**state, "visual.head": torch.randn(cfg.dim, 32), "log_scale": torch.tensor(2.6),
            "textual.token_embedding.weight": torch.randn(10, 8), "textual.blocks.0.attn.q.weight": torch.randn(8, 8),
            "textual.head.0.weight": torch.randn(8, 8)}


def test_wan_checkpoint_loads_with_text_tower_dropped() -> None:
    gen = fresh_generator()
    full = wan_checkpoint(TINY, gen)
    assert detect_layout(full) == "wan"
    state = to_wan_layout(full)
    ours = set(ClipVisionEncoder(TINY).state_dict())
    assert set(state) == ours and all(state[k] is full[k] for k in state)
    with pytest.raises(ValueError, match="unexpected key 'visual.transformer.0.ls_1.gamma'"):
        to_wan_layout({**full, "visual.transformer.0.ls_1.gamma": torch.ones(TINY.dim)})


def test_wan_layout_round_trips_through_hf_and_runs_there() -> None:
    gen = fresh_generator()
    full = wan_checkpoint(TINY, gen)
    hf = wan_to_hf(full)
    assert detect_layout(hf) == "hf"
    ref = CLIPVisionModelWithProjection(hf_config(TINY, projection_dim=32)).eval()
    missing, unexpected = ref.load_state_dict(hf, strict=False)
    assert missing == ["visual_projection.weight"] and unexpected == []  # Wan's head is not carried over
    back = hf_to_wan(hf)
    assert set(back) == set(to_wan_layout(full)) and all(torch.equal(back[k], full[k]) for k in back)
    ours = ClipVisionEncoder(TINY).eval()
    ours.load_state_dict(back)
    pix = pixels(gen, 2, 30, 50)
    with torch.no_grad():
        expected = ref(pixel_values=reference_input(pix, TINY.image_size), output_hidden_states=True).hidden_states[-2]
        assert rel_err(ours(pix), expected) < TOL


def test_hf_layouts_as_saved() -> None:
    # diffusers' image_encoder (CLIPVisionModelWithProjection, vision_model. prefix), a bare CLIPVisionModel
    # (no prefix under transformers >= 5, vision_model. as older versions saved it), and a whole CLIPModel
    # (text tower, projections, logit_scale): all give exactly our keys.
    ours = set(ClipVisionEncoder(TINY).state_dict())
    with_proj = CLIPVisionModelWithProjection(hf_config(TINY, projection_dim=32)).state_dict()
    bare = CLIPVisionModel(hf_config(TINY)).state_dict()
    old_bare = {f"vision_model.{k}": v for k, v in bare.items()}
    old_bare["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    whole_config = CLIPConfig(text_config=text, vision_config=hf_config(TINY).to_dict(), projection_dim=32)
    whole = CLIPModel(whole_config).state_dict()
    assert any(k.startswith("text_model.encoder.layers.") for k in whole) and "logit_scale" in whole
    for state in (with_proj, bare, old_bare, whole):
        assert detect_layout(state) == "hf"
        assert set(to_wan_layout(state)) == ours
    with pytest.raises(ValueError, match="unexpected key 'vision_model.encoder.layers.0.self_attn.qkv.weight'"):
        hf_to_wan({**with_proj, "vision_model.encoder.layers.0.self_attn.qkv.weight": torch.zeros(1)})
    del with_proj["vision_model.encoder.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(ValueError, match=r"without encoder\.layers\.1\.self_attn\.v_proj\.bias"):
        hf_to_wan(with_proj)


def open_clip_state(ref: CLIPVisionModel) -> dict[str, torch.Tensor]:
    """HF's tensors under open_clip's VisionTransformer names (in_proj rows q, k, v; proj [width, out])
    plus open_clip's top-level text tower, written out from open_clip's naming (open_clip is not installed)."""
    s = ref.state_dict()
    out = {"visual.conv1.weight": s["embeddings.patch_embedding.weight"],
           "visual.class_embedding": s["embeddings.class_embedding"],
           "visual.positional_embedding": s["embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": s["pre_layrnorm.weight"], "visual.ln_pre.bias": s["pre_layrnorm.bias"],
           "visual.ln_post.weight": s["post_layernorm.weight"], "visual.ln_post.bias": s["post_layernorm.bias"],
           "visual.proj": torch.randn(TINY.dim, 32), "logit_scale": torch.tensor(4.6),
           "token_embedding.weight": torch.randn(10, 8), "transformer.resblocks.0.ln_1.weight": torch.ones(8),
           "ln_final.weight": torch.ones(8), "text_projection": torch.randn(8, 32)}
    for i in range(TINY.num_layers):
        h, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{o}attn.in_proj_{p}"] = torch.cat([s[f"{h}self_attn.{n}_proj.{p}"] for n in "qkv"])
            for oc, hf in (("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
                           ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{o}{oc}.{p}"] = s[f"{h}{hf}.{p}"]
    return out


def test_open_clip_layout() -> None:
    gen = fresh_generator()
    ref = randomize(CLIPVisionModel(hf_config(TINY)), gen)
    state = open_clip_state(ref)
    assert detect_layout(state) == "open_clip"
    ours = ClipVisionEncoder(TINY).eval()
    ours.load_state_dict(to_wan_layout(state))
    pix = pixels(gen, 2, 28, 28)
    with torch.no_grad():
        expected = ref(pixel_values=reference_input(pix, TINY.image_size), output_hidden_states=True).hidden_states[-2]
        assert rel_err(ours(pix), expected) < TOL
    with pytest.raises(ValueError, match="unexpected key 'visual.transformer.resblocks.0.ls_1.gamma'"):
        open_clip_to_wan({**state, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(TINY.dim)})


def test_detect_layout_refuses_other_models() -> None:
    for keys in (["encoder.block.0.layer.0.SelfAttention.q.weight"],  # umT5 (HF)
                 ["blocks.0.attn.q.weight", "token_embedding.weight"],  # umT5 (Wan)
                 ["patch_embedding.weight", "blocks.0.self_attn.q.weight"],  # Wan DiT
                 ["textual.token_embedding.weight"]):  # only the text tower of Wan's CLIP
        with pytest.raises(ValueError, match="neither"):
            detect_layout(keys)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of num_heads"):
        ClipVisionConfig(dim=100, num_heads=16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ClipVisionConfig(image_size=225)
    with pytest.raises(ValueError, match="activation must be one of"):
        ClipVisionConfig(activation="swi_glu")
    # The compiler's detected arch for Wan's file (dim, patch_size, num_layers) builds ViT-H/14.
    assert ClipVisionConfig(dim=1280, patch_size=14, num_layers=32) == VIT_H_14


def test_vit_h_14_numbers() -> None:
    assert (VIT_H_14.image_size, VIT_H_14.patch_size, VIT_H_14.dim, VIT_H_14.mlp_dim, VIT_H_14.num_heads,
            VIT_H_14.num_layers, VIT_H_14.eps, VIT_H_14.activation) == (224, 14, 1280, 5120, 16, 32, 1e-5, "gelu")
    assert VIT_H_14.num_tokens == 257 and VIT_H_14.head_dim == 80
    with torch.device("meta"):
        ours = ClipVisionEncoder(VIT_H_14)
        ref = CLIPVisionModel(hf_config(VIT_H_14))
        ref_proj = CLIPVisionModelWithProjection(hf_config(VIT_H_14, projection_dim=1024))
        out = ours(torch.empty(1, 3, 480, 832))
    assert out.shape == (1, 257, 1280)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in hf_to_wan(ref.state_dict()).items()}
    assert ours_shapes["visual.pos_embedding"] == (1, 257, 1280) and ours_shapes["visual.cls_embedding"] == (1, 1, 1280)
    assert ours_shapes["visual.patch_embedding.weight"] == (1280, 3, 14, 14)
    assert ours_shapes["visual.transformer.31.attn.to_qkv.weight"] == (3840, 1280)
    assert ours_shapes["visual.transformer.31.mlp.0.weight"] == (5120, 1280)
    count = sum(v.numel() for v in ours.state_dict().values())
    assert count == sum(v.numel() for v in ref.state_dict().values()) == 630_766_080
    # The ~632 M usually quoted for the ViT-H/14 visual includes the 1280 x 1024 projection this module drops.
    assert count + 1280 * 1024 == sum(v.numel() for v in ref_proj.state_dict().values()) == 632_076_800


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    # ViT-H/14's head dim (80) and 257 tokens at a smaller width and depth, so CUDA takes its real paths.
    cfg = ClipVisionConfig(dim=320, mlp_dim=1280, num_heads=4, num_layers=3)
    gen = fresh_generator()
    model = ClipVisionEncoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 1.0))
    model.eval()
    pix = pixels(gen, 2, 480, 832)

    def run(device: str, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            return model.to(device, dtype)(pix.to(device)).float().cpu()

    expected = run("cpu", torch.float32)
    assert rel_err(run("cuda", torch.float32), expected) < 1e-4  # fp32 (TF32 off by default): summation order only
    for dtype in (torch.bfloat16, torch.float16):  # Wan runs its CLIP in fp16
        cuda, cpu = run("cuda", dtype), run("cpu", dtype)
        errs = rel_err(cuda, expected), rel_err(cpu, expected)
        assert errs[0] < 2 * errs[1], (dtype, errs)
