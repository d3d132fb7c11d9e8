"""umT5 tokenizer, loaded offline from a `tokenizer.json` (or a folder holding one).

Uses the `tokenizers` library directly: the file carries the model, the
normaliser and the post-processor that appends `</s>`, so nothing else is
needed. Text is cleaned as Wan cleans it ("whitespace": HTML entities
unescaped, whitespace runs collapsed, ends stripped). Wan also runs
`ftfy.fix_text` (mojibake repair); that needs the ftfy package and is left out.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

TEXT_LEN = 512
PAD_ID = 0


def clean_text(text: str) -> str:
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def resolve_tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    candidate = path / "tokenizer.json" if path.is_dir() else path
    if not candidate.is_file():
        raise ValueError(
            f"no tokenizer at {path}: expected a tokenizer.json file or a folder containing one "
            "(for Wan: the google/umt5-xxl folder shipped with the checkpoint)"
        )
    return candidate


class UMT5Tokenizer:
    def __init__(self, path: str | Path, text_len: int = TEXT_LEN) -> None:
        self.path = resolve_tokenizer_file(path)
        self.text_len = text_len
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.enable_truncation(max_length=text_len)
        self._tok.enable_padding(length=text_len, pad_id=PAD_ID, pad_token=self._tok.id_to_token(PAD_ID) or "<pad>")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both int64 [B, text_len]."""
        texts = [texts] if isinstance(texts, str) else texts
        encodings = self._tok.encode_batch([clean_text(t) for t in texts])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask


TINY_WORDS = (
    "a an the of in on at with and to from over under through by is are "
    "cat dog fox bird fish horse person man woman child car boat train city forest "
    "snow rain sun sunset night sky sea wave river mountain street field "
    "red orange yellow green blue purple white black golden bright dark "
    "running walking flying surfing swimming jumping dancing sitting "
    "fresh slow fast big small old young beautiful cinematic shot close up video"
).split()


def build_tiny_tokenizer(path: str | Path) -> Path:
    """Write a small deterministic umT5-style tokenizer.json (pad 0, </s> 1, <unk> 2; appends </s>)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in TINY_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
