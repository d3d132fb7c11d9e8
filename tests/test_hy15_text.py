"""HunyuanVideo-1.5's prompt handling (template, hidden state, crop; glyph texts for byT5) against diffusers'
HunyuanVideo15Pipeline.encode_prompt on tiny random transformers models (a 3-layer Qwen2.5-VL text model, a 2-layer
T5 encoder) and tiny tokenizers (bytes, plus Qwen's chat template and special tokens; ByT5's own).

The same models run on both sides, so the outputs must be equal (float32, same operations): tolerance 0. The crop
here is found from the "<|im_start|>user\\n" marker as Tencent's code does; diffusers takes it as a number
(108 for the real Qwen2.5-VL tokenizer), so diffusers is given the number found and the test checks separately
that the crop ends exactly at the marker.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from telefuser.models.hunyuan15 import text

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideo15Pipeline  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, decoders  # noqa: E402
from transformers import (ByT5Tokenizer, PreTrainedTokenizerFast, Qwen2_5_VLTextConfig,  # noqa: E402
                          Qwen2_5_VLTextModel, T5Config, T5EncoderModel)

QWEN_CHAT = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MAX_LEN, BYT5_LEN = 24, 32


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", padding_side="right")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = QWEN_CHAT
    return fast


@pytest.fixture(scope="module")
def models_and_tokenizers():
    torch.manual_seed(0)
    qtok = byte_tokenizer()
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(qtok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
        pad_token_id=qtok.pad_token_id)).eval()
    btok = ByT5Tokenizer()
    byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_kv=8, num_heads=2, num_layers=2, d_ff=32,
                                   feed_forward_proj="gated-gelu")).eval()
    return qwen, qtok, byt5, btok


PROMPTS = ['A neon sign that reads "OPEN" over a "Diner" door', "", 'Rain on “雨” and "OPEN" and "OPEN"']


def test_system_message_is_the_published_one() -> None:
    default = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
    assert text.SYSTEM_MESSAGE == default


def test_glyph_texts() -> None:
    assert text.glyph_text(PROMPTS[0]) == 'Text "OPEN". Text "Diner". '
    assert text.glyph_text("no quotes") is None
    assert text.glyph_text(PROMPTS[2]) == 'Text "雨". Text "OPEN". '


def test_crop_ends_at_the_user_marker(models_and_tokenizers) -> None:
    _, qtok, _, _ = models_and_tokenizers
    crop = text.crop_start(qtok)
    ids = qtok.apply_chat_template([text.chat("x")], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]
    assert qtok.decode(ids[:crop]).endswith("<|im_start|>user\n")
    assert qtok.decode(ids[crop:]).startswith("x<|im_end|>")


def test_matches_diffusers_encode_prompt(models_and_tokenizers) -> None:
    qwen, qtok, byt5, btok = models_and_tokenizers
    crop = text.crop_start(qtok)
    fake = SimpleNamespace(
        _execution_device=torch.device("cpu"), text_encoder=qwen, tokenizer=qtok, text_encoder_2=byt5, tokenizer_2=btok,
        system_message=text.SYSTEM_MESSAGE, prompt_template_encode_start_idx=crop, tokenizer_max_length=MAX_LEN,
        tokenizer_2_max_length=BYT5_LEN, _get_mllm_prompt_embeds=HunyuanVideo15Pipeline._get_mllm_prompt_embeds,
        _get_byt5_prompt_embeds=HunyuanVideo15Pipeline._get_byt5_prompt_embeds)
    with torch.no_grad():
        e_text, e_mask, e_byt5, e_byt5_mask = HunyuanVideo15Pipeline.encode_prompt(
            fake, PROMPTS, device=torch.device("cpu"), dtype=torch.float32, batch_size=len(PROMPTS))
        states, mask = text.encode_text(
            lambda ids, m: qwen(input_ids=ids, attention_mask=m, output_hidden_states=True).hidden_states,
            qtok, PROMPTS, max_length=MAX_LEN)
        g_states, g_mask = text.encode_glyphs(lambda ids, m: byt5(input_ids=ids, attention_mask=m)[0], btok, PROMPTS,
                                              dim=16, max_length=BYT5_LEN)
    assert states.shape == (3, MAX_LEN, 32) and torch.equal(states, e_text) and torch.equal(mask, e_mask.long())
    assert torch.equal(g_states, e_byt5) and torch.equal(g_mask, e_byt5_mask.long())
    assert mask[1].sum() > 0 and not g_mask[1].any()  # the empty prompt: " " has tokens; no glyphs


def test_telefuser_qwen_encoder_gives_the_same_text_states(models_and_tokenizers) -> None:
    """TeleFuser's Qwen2.5-VL language model (the layers up to hidden_states[-3] only) in place of transformers'."""
    from telefuser.models.hunyuan15.qwen_text import Qwen25VLTextConfig, Qwen25VLTextEncoder
    from telefuser.models.hunyuan15.qwen_text_keys import to_text_layout

    qwen, qtok, _, _ = models_and_tokenizers
    c = qwen.config
    ours = Qwen25VLTextEncoder(Qwen25VLTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        rope_theta=1e6, eps=c.rms_norm_eps)).eval()
    ours.load_state_dict(to_text_layout(qwen.state_dict()), strict=True)
    with torch.no_grad():
        expected, e_mask = text.encode_text(
            lambda ids, m: qwen(input_ids=ids, attention_mask=m, output_hidden_states=True).hidden_states,
            qtok, PROMPTS, max_length=MAX_LEN)
        got, mask = text.encode_text(ours, qtok, PROMPTS, max_length=MAX_LEN)
    assert torch.equal(mask, e_mask)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_rendered_template_and_plain_tokenization_match_the_chat_template(models_and_tokenizers) -> None:
    _, qtok, _, _ = models_and_tokenizers
    for prompt in PROMPTS:
        assert text.render_prompt(prompt) == qtok.apply_chat_template([text.chat(prompt)], add_generation_prompt=True,
                                                                      tokenize=False)[0]
    fast = Tokenizer.from_str(qtok.backend_tokenizer.to_str())  # a plain tokenizers.Tokenizer: no Jinja, no transformers
    fast.no_padding()
    fast.no_truncation()
    ids, mask, crop = text.tokenize_rendered(lambda s: fast.encode(s).ids, PROMPTS, qtok.pad_token_id, MAX_LEN)
    ref = qtok.apply_chat_template([text.chat(p) for p in PROMPTS], add_generation_prompt=True, tokenize=True,
                                   return_dict=True, padding="max_length", max_length=MAX_LEN + crop, truncation=True,
                                   return_tensors="pt")
    assert crop == text.crop_start(qtok)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_byt5_ids_match_the_byt5_tokenizer(models_and_tokenizers) -> None:
    _, _, _, btok = models_and_tokenizers
    for prompt in PROMPTS + ['"' + "long glyph text " * 20 + '"']:
        glyph = text.glyph_text(prompt)
        if glyph is None:
            continue
        ref = btok(glyph, padding="max_length", max_length=BYT5_LEN, truncation=True, add_special_tokens=True,
                   return_tensors="pt")
        ids, mask = text.byt5_ids(glyph, BYT5_LEN)
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
