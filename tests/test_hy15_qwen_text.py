"""Qwen2.5-VL's language model as HunyuanVideo-1.5's text encoder against transformers' Qwen2_5_VLTextModel on a
tiny random config: our output is its hidden_states[-3] (2 layers skipped), and with no skipped layer its last
(normed) state; right-padded batches; the hub checkpoint's key spellings.

Tolerance 1e-5 relative, float32 on both sides (RMSNorm weight applied in float32 here, RoPE angles in float64
here): measured ~1e-7."""

from __future__ import annotations

import pytest
import torch

from telefuser.models.hunyuan15.qwen_text import Qwen25VLTextConfig, Qwen25VLTextEncoder
from telefuser.models.hunyuan15.qwen_text_keys import detect_layout, to_text_layout

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel  # noqa: E402

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]})).eval()
    with torch.no_grad():  # non-trivial norm weights
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref


@pytest.mark.parametrize("skip", [2, 0])
def test_matches_transformers(reference, skip: int) -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (2, 11), generator=gen)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    ours = Qwen25VLTextEncoder(Qwen25VLTextConfig(**TINY, skip_layers=skip)).eval()
    ours.load_state_dict(to_text_layout(reference.state_dict()), strict=True)
    assert len(ours.layers) == 4 - skip
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-(skip + 1)]
        got = ours(ids, mask)
    valid = mask.bool()
    assert rel_err(got[valid], expected[valid]) < 1e-5
    assert rel_err(got, expected) < 1e-5  # padded positions too (causal + key-padding mask, as transformers)


def test_hub_key_spellings() -> None:
    state = Qwen25VLTextEncoder(Qwen25VLTextConfig(**TINY, skip_layers=0)).state_dict()
    hub = {("model." + k): v for k, v in state.items()} | {"lm_head.weight": torch.zeros(1), "visual.blocks.0.x": torch.zeros(1)}
    new = {("model.language_model." + k): v for k, v in state.items()} | {"model.visual.merger.x": torch.zeros(1)}
    for layout in (hub, new, state):
        assert detect_layout(layout) == "hf" and to_text_layout(layout).keys() == state.keys()
