"""HunyuanVideo-1.5's byT5 glyph encoder as UMT5Encoder(shared_pos=True) against transformers' T5EncoderModel
(gated-gelu, T5 v1.1 / byT5) on a tiny random config, from both the Hugging Face and Tencent's Glyph-SDXL-v2
layouts; detection of the published byT5-small shapes.

Tolerance 1e-5 relative on the valid tokens, float32 both sides (measured ~1e-7): padded keys get the dtype's
minimum here and a -inf-like bias there, both exact zeros after the softmax."""

from __future__ import annotations

import pytest
import torch

from telefuser.models import registry
from telefuser.models.hunyuan15 import detect
from telefuser.models.hunyuan15.byt5_keys import detect_layout, to_umt5_layout

transformers = pytest.importorskip("transformers")
from transformers import T5Config, T5EncoderModel  # noqa: E402


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("layout", ["hf", "glyph"])
def test_matches_transformers_t5_encoder(layout: str) -> None:
    torch.manual_seed(0)
    ref = T5EncoderModel(T5Config(vocab_size=400, d_model=16, d_kv=8, num_heads=2, num_layers=3, d_ff=32,
                                  feed_forward_proj="gated-gelu")).eval()
    state = ref.state_dict()
    if layout == "glyph":  # Tencent's byt5_model.pt: the encoder stack under module.text_tower.encoder.
        state = {"module.text_tower.encoder." + k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    found = detect.detect(shapes)
    assert found is not None and (found.class_name, found.layout) == ("ByT5Encoder", layout)
    entry = registry.get("ByT5Encoder")
    assert entry.detect_layout(state.keys()) == layout
    ours = entry.model_class(entry.config_class(**found.arch)).eval()
    ours.load_state_dict(entry.convert(state, layout), strict=True)
    ids = torch.randint(0, 400, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.float())[0]
        got = ours(ids, mask)
    valid = mask.bool()
    assert rel_err(got[valid], expected[valid]) < 1e-5


def test_published_byt5_small_detected() -> None:
    from telefuser.models.t5.umt5 import UMT5Config, UMT5Encoder

    # byT5-small with Tencent's extra color / font tokens (the embedding rows count them; 1510 is an example)
    with torch.device("meta"):
        ref = T5EncoderModel(T5Config(vocab_size=1510, d_model=1472, d_kv=64, num_heads=6, num_layers=12, d_ff=3584,
                                      feed_forward_proj="gated-gelu"))
        hf = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = UMT5Config(vocab_size=1510, dim=1472, dim_attn=384, dim_ffn=3584, num_heads=6, num_layers=12, num_buckets=32,
                     shared_pos=True)
    found = detect.detect(hf)
    assert found is not None and found.class_name == "ByT5Encoder" and UMT5Config(**found.arch) == cfg
    with torch.device("meta"):
        own = UMT5Encoder(cfg).state_dict()
    assert detect_layout(hf) == "hf" and set(to_umt5_layout(hf)) == set(own)
