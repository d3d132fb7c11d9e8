"""Text stage: prompt -> umT5 embedding of `text_len` tokens, as Wan feeds its DiT."""

from __future__ import annotations

import html
import re

import torch


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: unescape HTML entities, collapse runs of whitespace.

    (Wan also runs ftfy.fix_text first; ftfy is not a dependency, and it changes only
    mis-encoded text, which prompts typed or passed as str do not contain.)
    """
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask `[B, text_len]`: special tokens added, truncated, padded to text_len.

    `tokenizer` is a `tokenizers.Tokenizer` (the umT5 tokenizer.json).
    """
    pad_id = tokenizer.token_to_id("<pad>")
    tokenizer.enable_truncation(max_length=text_len)
    tokenizer.enable_padding(length=text_len, pad_id=0 if pad_id is None else pad_id, pad_token="<pad>")
    encodings = tokenizer.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=True)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return ids, mask


@torch.no_grad()
def encode_prompts(encoder: torch.nn.Module, tokenizer, prompts: list[str], text_len: int, device: torch.device):
    """`[B, text_len, dim]` float32: each prompt's embedding up to its real length, zeros after.

    Wan cuts every embedding to its prompt's token count and zero-pads it back to
    text_len before the DiT's text projection; zeroing the padded rows is the same.
    """
    ids, mask = tokenize(tokenizer, prompts, text_len)
    ids, mask = ids.to(device), mask.to(device)
    context = encoder(ids, mask).float()
    return context * mask.unsqueeze(-1).to(context.dtype)
