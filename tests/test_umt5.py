"""umT5 encoder against transformers' UMT5EncoderModel; key layouts; tokenizer."""

from __future__ import annotations

import pytest
import torch

from telefuser.models.t5.tokenizer import UMT5Tokenizer, build_tiny_tokenizer, clean_text
from telefuser.models.t5.umt5 import UMT5_XXL, UMT5Config, UMT5Encoder
from telefuser.models.t5.umt5_keys import detect_layout, hf_to_wan, to_wan_layout, wan_to_hf

transformers = pytest.importorskip("transformers")
from transformers import UMT5Config as HFConfig, UMT5EncoderModel  # noqa: E402


def hf_model(cfg: UMT5Config) -> UMT5EncoderModel:
    return UMT5EncoderModel(
        HFConfig(
            vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads, d_ff=cfg.dim_ffn,
            num_layers=cfg.num_layers, num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
            layer_norm_epsilon=1e-6,
        )
    )


TINY = UMT5Config(vocab_size=100, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=8)


def test_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ref = hf_model(TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ours = UMT5Encoder(TINY).eval()
    ours.load_state_dict(to_wan_layout(ref.state_dict()))
    length = 200  # long enough that distances reach the log-spaced buckets and beyond 128
    ids = torch.randint(3, TINY.vocab_size, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 57:] = 0
    with torch.no_grad():
        out = ours(ids, mask)
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    # fp32 on both sides: only summation order differs (~1e-6); padded query rows are not compared
    # because both implementations leave them unconstrained.
    for b, n in ((0, length), (1, 57)):
        err = (out[b, :n] - expected[b, :n]).norm() / expected[b, :n].norm()
        assert err < 1e-4


def test_full_size_keys_and_shapes() -> None:
    with torch.device("meta"):
        ours = UMT5Encoder(UMT5_XXL)
        ref = hf_model(UMT5_XXL)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in hf_to_wan(ref.state_dict()).items()}
    assert ours_shapes == ref_shapes
    assert ours_shapes["blocks.5.pos_embedding.embedding.weight"] == (32, 64)


def test_layout_round_trip() -> None:
    wan = UMT5Encoder(TINY).state_dict()
    hf = wan_to_hf(wan)
    assert detect_layout(wan) == "wan" and detect_layout(hf) == "hf"
    assert set(hf) == set(hf_model(TINY).state_dict())
    back = hf_to_wan(hf)
    assert set(back) == set(wan) and all(back[k] is wan[k] for k in wan)
    with pytest.raises(ValueError):
        detect_layout(["patch_embedding.weight"])


def test_tokenizer(tmp_path) -> None:
    path = build_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json")
    tok = UMT5Tokenizer(path.parent, text_len=8)  # a folder holding tokenizer.json
    ids, mask = tok(["A  red fox\n running", "zebra"])
    assert ids.shape == mask.shape == (2, 8)
    vocab = tok._tok.get_vocab()
    assert ids[0, :5].tolist() == [vocab["a"], vocab["red"], vocab["fox"], vocab["running"], 1]  # </s> appended
    assert mask[0].tolist() == [1] * 5 + [0] * 3 and ids[0, 5:].tolist() == [0, 0, 0]
    assert ids[1, :2].tolist() == [2, 1]  # unknown word -> <unk>
    long_ids, long_mask = tok(" ".join(["cat"] * 50))
    assert long_mask.sum() == 8 and long_ids[0, -1] == 1  # truncated, still ends with </s>
    assert clean_text("  a&amp;b \t c ") == "a&b c"
    with pytest.raises(ValueError, match="no tokenizer"):
        UMT5Tokenizer(tmp_path / "missing")
