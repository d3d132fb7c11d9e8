"""Text stage: prompts -> umT5 embeddings of `text_len` tokens, as Wan feeds its DiT."""

from __future__ import annotations

from typing import Callable

import torch

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def encode_prompts(encoder: torch.nn.Module, tokenizer: Tokenize, prompts: list[str], device: torch.device):
    """`[B, text_len, dim]` float32: each prompt's embedding up to its real length, zeros after.

    `tokenizer` (telefuser.models.t5.tokenizer.UMT5Tokenizer) cleans the text, appends </s>
    and pads/truncates to text_len. Wan cuts every embedding to its prompt's token count
    and zero-pads it back to text_len before the DiT's text projection; zeroing the
    padded rows is the same thing without the ragged list.
    """
    ids, mask = tokenizer(prompts)
    ids, mask = ids.to(device), mask.to(device)
    context = encoder(ids, mask).float()
    return context * mask.unsqueeze(-1).to(context.dtype)
