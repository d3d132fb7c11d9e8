"""How HunyuanVideo-1.5 turns a prompt into the DiT's two text inputs (facts from tencent/HunyuanVideo-1.5's
TextEncoder / pipeline and diffusers' HunyuanVideo15Pipeline, which agree on every number below).

Qwen2.5-VL-7B-Instruct as the text encoder (`text_states`, 3584 wide):
- only its language model runs (diffusers loads `Qwen2_5_VLTextModel`); for text-only input the 3-D mRoPE positions
  are equal on all three axes, i.e. ordinary 1-D RoPE;
- the prompt goes through the tokenizer's chat template as [system: SYSTEM_MESSAGE, user: prompt] with the
  generation prompt appended (an empty prompt becomes " "), padded (right) / truncated to TEXT_MAX_LENGTH + crop
  tokens, with the attention mask passed to the model;
- the hidden state taken is `hidden_states[-(HIDDEN_STATE_SKIP_LAYER + 1)]` = hidden_states[-3]: the output of
  the third-to-last entry of the per-layer outputs (embeddings first), i.e. after all but the last two decoder
  layers, without the final RMSNorm (Tencent: hidden_state_skip_layer=2, apply_final_norm=False);
- the first `crop` tokens are dropped from the states and the mask: everything up to and including the
  "<|im_start|>user\\n" marker (the system turn), so the DiT sees the prompt's tokens, the closing
  "<|im_end|>\\n<|im_start|>assistant\\n" tokens and padding. Tencent finds the marker in the tokens; diffusers
  hard-codes 108, the marker's end for Qwen2.5-VL's tokenizer. Here: found, as Tencent does (`crop_start`);
- TEXT_MAX_LENGTH = 1000 tokens after the crop; the mask marks the real ones (the DiT keeps only those).

byT5 for quoted text (`byt5_states`, 1472 wide: Glyph-SDXL-v2's byT5-small encoder, a T5 encoder on bytes):
- the glyph texts are the prompt's substrings in "..." or “...” (deduplicated, in order, when more than one);
- formatted as 'Text "a". Text "b". ' and tokenized (bytes + </s>) padded / truncated to BYT5_MAX_LENGTH = 256;
- the encoder's last hidden state with that mask; a prompt without quoted text gives zeros and a mask of zeros
  (no glyph token reaches the DiT). Tencent encodes the negative prompt's glyphs as those of "" (always none);
  diffusers extracts them from the negative prompt text.

The models themselves are passed in as callables: `qwen_text.Qwen25VLTextEncoder` (TeleFuser's Qwen2.5-VL language
model) or any Hugging Face-style model; a TeleFuser byT5 module is not part of this package yet.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

_ASPECTS = (
    "1. The main content and theme of the video.",
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.",
    "4. background environment, light, style and atmosphere.",
    "5. camera angles, movements, and transitions used in the video.",
)
# Each aspect follows a space and the 8-space indent of the published source's continued string literal.
SYSTEM_MESSAGE = ("You are a helpful assistant. Describe the video by detailing the following aspects:"
                  + "".join(" " + " " * 8 + a for a in _ASPECTS))
USER_MARKER = "<|im_start|>user\n"
TEXT_MAX_LENGTH = 1000
HIDDEN_STATE_SKIP_LAYER = 2
BYT5_MAX_LENGTH = 256
QWEN25_VL_CROP = 108  # the marker's end for Qwen2.5-VL-7B-Instruct's tokenizer (diffusers' constant)

_GLYPH = re.compile(r"\"(.*?)\"|“(.*?)”")


def render_prompt(prompt: str, system_message: str = SYSTEM_MESSAGE) -> str:
    """The templated text Qwen2.5-VL's chat template makes of [system, user] with the generation prompt, for
    string contents (no tokenizer or Jinja needed: the text stage can tokenize it with `tokenizers`)."""
    user = prompt if prompt else " "
    return (f"<|im_start|>system\n{system_message}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def tokenize_rendered(encode: Callable[[str], Sequence[int]], prompts: Sequence[str], pad_id: int,
                      max_length: int = TEXT_MAX_LENGTH, system_message: str = SYSTEM_MESSAGE,
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask [B, max_length + crop], crop) from a plain `encode(text) -> ids` (e.g. a
    `tokenizers.Tokenizer`'s), right-padded with `pad_id` and truncated as the chat-template path does."""
    marker = list(encode(USER_MARKER))
    sample = list(encode(render_prompt("x", system_message)))
    crop = next((i + len(marker) for i in range(len(sample) - len(marker) + 1) if sample[i: i + len(marker)] == marker),
                None)
    if crop is None:
        raise ValueError(f"the tokenizer splits the {USER_MARKER!r} marker differently in context; is it Qwen2.5-VL's?")
    total = max_length + crop
    ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), total, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        row = list(encode(render_prompt(prompt, system_message)))[:total]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask, crop


def byt5_ids(text: str, max_length: int = BYT5_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """byT5's tokenization without a tokenizer object: UTF-8 bytes + 3 (0 pad, 1 </s>, 2 unk), then </s>, truncated
    to `max_length` (keeping the </s>), padded with 0: ([1, max_length], [1, max_length] mask)."""
    row = [b + 3 for b in text.encode("utf-8")][: max_length - 1] + [1]
    ids = torch.zeros(1, max_length, dtype=torch.long)
    ids[0, : len(row)] = torch.tensor(row)
    return ids, (ids != 0).long()


def chat(prompt: str, system_message: str = SYSTEM_MESSAGE) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_message}, {"role": "user", "content": prompt if prompt else " "}]


def crop_start(tokenizer: Any, system_message: str = SYSTEM_MESSAGE) -> int:
    """The number of leading tokens to drop: up to the end of the user marker in the templated prompt."""
    ids = tokenizer.apply_chat_template([chat("x", system_message)], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"][0]
    ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    marker = list(tokenizer(USER_MARKER, add_special_tokens=False)["input_ids"])
    for i in range(len(ids) - len(marker) + 1):
        if ids[i: i + len(marker)] == marker:
            return i + len(marker)
    raise ValueError(f"the tokenizer's chat template has no {USER_MARKER!r} marker; is it Qwen2.5-VL's tokenizer?")


def encode_text(
    hidden_states: Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]],
    tokenizer: Any,
    prompts: Sequence[str],
    max_length: int = TEXT_MAX_LENGTH,
    system_message: str = SYSTEM_MESSAGE,
    crop: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_states [B, max_length, D], text_mask [B, max_length] int64) for the DiT.

    `hidden_states(input_ids, attention_mask)` returns either the language model's per-layer outputs, embeddings
    first (Hugging Face's `output_hidden_states=True` convention), of which hidden_states[-3] is taken, or that
    state itself (a tensor: `Qwen25VLTextEncoder`, which runs only the layers needed); `crop` defaults to
    `crop_start(tokenizer)`.
    """
    crop = crop_start(tokenizer, system_message) if crop is None else crop
    tokens = tokenizer.apply_chat_template([chat(p, system_message) for p in prompts], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, padding="max_length",
                                           max_length=max_length + crop, truncation=True, return_tensors="pt")
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    out = hidden_states(ids, mask)
    states = out if isinstance(out, torch.Tensor) else out[-(HIDDEN_STATE_SKIP_LAYER + 1)]
    return states[:, crop:], mask[:, crop:]


def glyph_text(prompt: str) -> str | None:
    """The byT5 input for a prompt: its quoted texts as 'Text "a". Text "b". ', or None without quotes."""
    found = [a or b for a, b in _GLYPH.findall(prompt)]
    if len(found) > 1:
        found = list(dict.fromkeys(found))
    return "".join(f'Text "{t}". ' for t in found) if found else None


def encode_glyphs(
    encoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer: Any,
    prompts: Sequence[str],
    dim: int,
    max_length: int = BYT5_MAX_LENGTH,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(byt5_states [B, max_length, dim], byt5_mask [B, max_length] int64); `encoder(input_ids, float mask)`
    returns the byT5 encoder's last hidden state."""
    states, masks = [], []
    for prompt in prompts:
        text = glyph_text(prompt)
        if text is None:
            states.append(torch.zeros(1, max_length, dim, device=device, dtype=dtype))
            masks.append(torch.zeros(1, max_length, dtype=torch.int64, device=device))
            continue
        tok = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                        return_tensors="pt")
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        states.append(encoder(ids, mask.float()).to(dtype))
        masks.append(mask)
    return torch.cat(states), torch.cat(masks)
