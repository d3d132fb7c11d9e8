"""umT5 encoder against transformers' UMT5EncoderModel / T5EncoderModel; key layouts; tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from telefuser.models.t5.tokenizer import TINY_WORDS, UMT5Tokenizer, build_tiny_tokenizer, clean_text
from telefuser.models.t5.umt5 import UMT5_XXL, UMT5Config, UMT5Encoder, clamp_fp16, relative_position_bucket
from telefuser.models.t5.umt5_keys import detect_layout, hf_to_wan, to_wan_layout, wan_to_hf

transformers = pytest.importorskip("transformers")
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Model  # noqa: E402
from transformers import UMT5Config as HFConfig, UMT5EncoderModel  # noqa: E402
from transformers.models.umt5.modeling_umt5 import UMT5Attention  # noqa: E402

TINY = UMT5Config(vocab_size=100, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=8)


def hf_kwargs(cfg: UMT5Config) -> dict:
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads, d_ff=cfg.dim_ffn,
                num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads,
                relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)


def hf_model(cfg: UMT5Config) -> UMT5EncoderModel:
    return UMT5EncoderModel(HFConfig(**hf_kwargs(cfg)))


def randomize(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    # Weights of scale 0.3 (not the near-identity init) so every term of the block matters.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def padded_batch(gen: torch.Generator, vocab: int, length: int, lengths: tuple[int, ...]):
    ids = torch.randint(3, vocab, (len(lengths), length), generator=gen)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def assert_close_on_real_tokens(out: torch.Tensor, expected: torch.Tensor, lengths: tuple[int, ...]) -> None:
    # fp32 on both sides: only summation order differs, which leaves ~1e-6 relative error after
    # two layers; 1e-4 is far below what any real difference (a wrong bucket, a missing mask, an
    # exact instead of tanh GELU, a 1/sqrt(d) scale) produces (>1e-2). Rows at padded positions are
    # not compared: neither implementation defines them, and callers cut them off.
    for b, n in enumerate(lengths):
        err = (out[b, :n] - expected[b, :n]).norm() / expected[b, :n].norm()
        assert err < 1e-4, (b, err)


def test_buckets_match_transformers() -> None:
    # Full-size settings (32 buckets, max distance 128), distances past 128 in both directions.
    rel = torch.arange(-400, 401)[None, :]
    hf_self = SimpleNamespace(relative_attention_num_buckets=32, relative_attention_max_distance=128, is_decoder=False)
    assert torch.equal(relative_position_bucket(rel, 32), UMT5Attention._relative_position_bucket(hf_self, rel))


def test_matches_umt5_encoder_with_padding() -> None:
    gen = fresh_generator()
    ref = randomize(hf_model(TINY), gen)
    ours = UMT5Encoder(TINY).eval()
    ours.load_state_dict(to_wan_layout(ref.state_dict()))
    lengths = (200, 57, 1)  # 200: distances reach the log-spaced buckets and beyond 128; 1: only </s>
    ids, mask = padded_batch(gen, TINY.vocab_size, 200, lengths)
    with torch.no_grad():
        out = ours(ids, mask)
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_on_real_tokens(out, expected, lengths)


def test_shared_position_bias_matches_t5_encoder() -> None:
    # shared_pos=True is T5 v1.1's scheme: one table (HF keeps it in block 0) used by every block.
    cfg = UMT5Config(**{**TINY.__dict__, "shared_pos": True})
    gen = fresh_generator()
    ref = randomize(T5EncoderModel(T5Config(**hf_kwargs(cfg))), gen)
    state = hf_to_wan(ref.state_dict())
    state["pos_embedding.embedding.weight"] = state.pop("blocks.0.pos_embedding.embedding.weight")
    ours = UMT5Encoder(cfg).eval()
    ours.load_state_dict(state)
    lengths = (150, 40)
    ids, mask = padded_batch(gen, cfg.vocab_size, 150, lengths)
    with torch.no_grad():
        out = ours(ids, mask)
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_on_real_tokens(out, expected, lengths)


def test_padding_tokens_do_not_reach_real_ones() -> None:
    gen = fresh_generator()
    model = randomize(UMT5Encoder(TINY), gen)
    ids, mask = padded_batch(gen, TINY.vocab_size, 24, (24, 9))
    other = ids.clone()
    other[1, 9:] = torch.randint(3, TINY.vocab_size, (15,), generator=gen)
    with torch.no_grad():
        a, b = model(ids, mask), model(other, mask)
    # Masked keys get exp(finfo.min - max) == 0 exactly, so the real rows are bit-identical.
    assert torch.equal(a[:, :9], b[:, :9]) and torch.equal(a[0], b[0])


def test_bf16_tracks_fp32() -> None:
    gen = fresh_generator()
    model = randomize(UMT5Encoder(TINY), gen)
    ids, mask = padded_batch(gen, TINY.vocab_size, 40, (40, 13))
    with torch.no_grad():
        ref = model(ids, mask)
        out = model.to(torch.bfloat16)(ids, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); two layers of matmuls,
    # softmax and norms compound that to ~1e-2. 5e-2 still catches a broken bf16 path (masking
    # turned into NaN/inf, fp32-only casts), which gives O(1) errors.
    for b, n in enumerate((40, 13)):
        err = (out[b, :n].float() - ref[b, :n]).norm() / ref[b, :n].norm()
        assert err < 5e-2, (b, err)


def test_fp16_clamp_only_after_overflow() -> None:
    finite = torch.tensor([65000.0, -1.0], dtype=torch.float16)
    assert torch.equal(clamp_fp16(finite), finite)  # nothing overflowed: untouched, as in Wan
    clamped = clamp_fp16(torch.tensor([float("inf"), 65000.0, -float("inf")], dtype=torch.float16))
    assert torch.isfinite(clamped).all() and clamped.abs().max() <= 65504 - 1000 + 16  # fp16 spacing there is 32


def test_full_size_keys_and_shapes() -> None:
    with torch.device("meta"):
        ours = UMT5Encoder(UMT5_XXL)
        ref = hf_model(UMT5_XXL)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in hf_to_wan(ref.state_dict()).items()}
    assert ours_shapes == ref_shapes
    assert ours_shapes["token_embedding.weight"] == (256384, 4096)
    assert ours_shapes["blocks.23.pos_embedding.embedding.weight"] == (32, 64)
    assert ours_shapes["blocks.0.ffn.gate.0.weight"] == ours_shapes["blocks.0.ffn.fc1.weight"] == (10240, 4096)
    assert sum(v.numel() for v in ours.state_dict().values()) == 5_680_910_336  # ~5.7 B parameters


def test_layout_round_trip() -> None:
    wan = UMT5Encoder(TINY).state_dict()
    hf = wan_to_hf(wan)
    assert detect_layout(wan) == "wan" and detect_layout(hf) == "hf"
    assert set(hf) == set(hf_model(TINY).state_dict())
    assert hf["shared.weight"] is hf["encoder.embed_tokens.weight"]
    back = hf_to_wan(hf)
    assert set(back) == set(wan) and all(back[k] is wan[k] for k in wan)
    assert to_wan_layout(wan) == wan
    with pytest.raises(ValueError, match="neither"):
        detect_layout(["patch_embedding.weight"])
    with pytest.raises(ValueError, match="unexpected key 'blocks.0.attn.qkv.weight'"):
        wan_to_hf({**wan, "blocks.0.attn.qkv.weight": wan["blocks.0.attn.q.weight"]})


def test_hf_checkpoints_as_saved() -> None:
    # Safetensors keep one of two tied tensors (often only shared.weight); the full seq2seq
    # checkpoint (google/umt5-xxl) adds a decoder and lm_head the encoder does not use.
    ours = set(UMT5Encoder(TINY).state_dict())
    encoder_only = hf_model(TINY).state_dict()
    del encoder_only["encoder.embed_tokens.weight"]
    full = UMT5Model(HFConfig(**hf_kwargs(TINY))).state_dict()
    assert any(k.startswith("decoder.") for k in full)
    assert set(to_wan_layout(encoder_only)) == ours and set(to_wan_layout(full)) == ours


@pytest.fixture
def tiny_tokenizer_file(tmp_path):
    return build_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json")


def test_tokenizer_pads_truncates_and_appends_eos(tiny_tokenizer_file) -> None:
    tok = UMT5Tokenizer(tiny_tokenizer_file.parent, text_len=8)  # a folder holding tokenizer.json
    vocab = tok._tok.get_vocab()
    ids, mask = tok(["A  red fox\n running", "zebra"])
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == torch.long
    assert ids[0, :5].tolist() == [vocab["a"], vocab["red"], vocab["fox"], vocab["running"], 1]  # </s> appended
    assert mask[0].tolist() == [1] * 5 + [0] * 3 and ids[0, 5:].tolist() == [0, 0, 0]
    assert ids[1, :2].tolist() == [2, 1]  # unknown word -> <unk>
    long_ids, long_mask = tok(" ".join(["cat"] * 50))
    assert long_mask.sum() == 8 and long_ids[0, :7].eq(vocab["cat"]).all() and long_ids[0, -1] == 1
    empty_ids, empty_mask = tok("")
    assert empty_ids[0, 0] == 1 and empty_mask.sum() == 1  # an empty prompt still encodes </s>
    assert tok.vocab_size == len(vocab)


def test_tokenizer_matches_transformers_call_as_wan_makes_it(tiny_tokenizer_file) -> None:
    # Wan calls the HF tokenizer with padding="max_length", truncation=True, max_length=text_len
    # on whitespace-cleaned text; the same file through transformers must give the same tensors.
    gen = fresh_generator()
    words = [*TINY_WORDS, "zebra", "Cat", "&amp;"]
    texts = [" ".join(words[i] for i in torch.randint(len(words), (int(n),), generator=gen))
             for n in torch.randint(0, 30, (6,), generator=gen)]
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tiny_tokenizer_file), pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>")
    expected = ref([clean_text(t) for t in texts], padding="max_length", truncation=True, max_length=16,
                   return_tensors="pt")
    ids, mask = UMT5Tokenizer(tiny_tokenizer_file, text_len=16)(texts)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])


def test_clean_text() -> None:
    assert clean_text("  a&amp;amp;b \t\n c\u3000d ") == "a&b c d"  # entities unescaped twice, any whitespace


def test_missing_tokenizer_errors_name_path_and_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match="missing.*no such file or folder"):
        UMT5Tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        UMT5Tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(ValueError, match="only the SentencePiece spiece.model"):
        UMT5Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers JSON file"):
        UMT5Tokenizer(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    # A wider model than TINY so the GEMMs take CUDA's real paths (cuBLASLt GELU epilogue, SDPA with a bias).
    cfg = UMT5Config(vocab_size=500, dim=256, dim_attn=256, dim_ffn=640, num_heads=4, num_layers=2, num_buckets=32)
    gen = fresh_generator()
    model = UMT5Encoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)  # unit-scale activations
    model.eval()
    lengths = (300, 77)
    ids, mask = padded_batch(gen, cfg.vocab_size, 300, lengths)

    def run(device: str, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            return model.to(device, dtype)(ids.to(device), mask.to(device)).float().cpu()

    def err(out: torch.Tensor, ref: torch.Tensor) -> float:
        return max(float((out[b, :n] - ref[b, :n]).norm() / ref[b, :n].norm()) for b, n in enumerate(lengths))

    expected = run("cpu", torch.float32)
    assert err(run("cuda", torch.float32), expected) < 1e-4  # fp32 (TF32 off by default): summation order only
    # bf16 as deployed: bounded by the same model's own bf16 rounding noise on the CPU.
    cuda_bf16, cpu_bf16 = run("cuda", torch.bfloat16), run("cpu", torch.bfloat16)
    assert err(cuda_bf16, expected) < 2 * err(cpu_bf16, expected), (err(cuda_bf16, expected), err(cpu_bf16, expected))
