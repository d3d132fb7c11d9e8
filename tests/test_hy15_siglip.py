"""SigLIP's vision tower (HunyuanVideo-1.5's I2V image encoder) against transformers' SiglipVisionModel on a tiny
random config: last_hidden_state from the same pixels, from a SiglipModel-style file (text tower and head dropped),
detection (not taken for CLIP), and the published so400m shapes.

Tolerance 1e-5 relative, float32 both sides (measured ~1e-7)."""

from __future__ import annotations

import pytest
import torch

from telefuser.models import registry
from telefuser.models.hunyuan15 import detect
from telefuser.models.hunyuan15.siglip import SigLIPVisionConfig, SigLIPVisionEncoder

transformers = pytest.importorskip("transformers")
from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: E402


def test_matches_transformers() -> None:
    torch.manual_seed(0)
    ref = SiglipVisionModel(SiglipVisionConfig(hidden_size=144, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=28, patch_size=14)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = ref.state_dict() | {"text_model.embeddings.token_embedding.weight": torch.zeros(3, 4), "logit_scale": torch.zeros(1)}
    found = detect.detect({k: tuple(v.shape) for k, v in state.items()})
    assert found is not None and found.class_name == "SigLIPVision"
    entry = registry.get("SigLIPVision")
    ours = entry.model_class(entry.config_class(**found.arch)).eval()
    ours.load_state_dict(entry.convert(state, entry.detect_layout(state.keys())), strict=True)
    pixels = torch.rand(2, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        expected = ref(pixel_values=pixels).last_hidden_state
        got = ours(ours.preprocess(pixels))
    assert got.shape == (2, 4, 144)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_published_so400m_detected_and_clip_not() -> None:
    with torch.device("meta"):
        ref = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                   num_attention_heads=16, image_size=384, patch_size=14))
    found = detect.detect({k: tuple(v.shape) for k, v in ref.state_dict().items()})
    assert found is not None and SigLIPVisionConfig(**found.arch) == SigLIPVisionConfig()
    assert SigLIPVisionConfig().tokens == 729
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=28, patch_size=14))
    assert detect.detect({k: tuple(v.shape) for k, v in clip.state_dict().items()}) is None


def test_preprocess_resizes_to_the_image_size() -> None:
    enc = SigLIPVisionEncoder(SigLIPVisionConfig(image_size=28, patch_size=14, dim=144, mlp_dim=64, num_heads=2,
                                                 num_layers=1))
    out = enc.preprocess(torch.zeros(1, 3, 50, 70) + 0.25)
    assert out.shape == (1, 3, 28, 28) and torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)
