"""umT5 tokenizer, loaded offline from a `tokenizer.json` (or a folder holding one).

Uses the `tokenizers` library directly: the file carries the model, the
normaliser and the post-processor that appends `</s>`, so nothing else is
needed. Text is cleaned as Wan's "whitespace" clean does (HTML entities
unescaped twice, whitespace runs collapsed to one space, ends stripped). Wan
first runs `ftfy.fix_text` (mojibake and odd-glyph repair); that needs the ftfy
package, which TeleFuser does not depend on, so only already-clean text
tokenizes exactly as in Wan. Then, as Wan's call to the Hugging Face tokenizer:
`</s>` appended, truncated to `text_len` (keeping the `</s>`), padded with id 0.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

TEXT_LEN = 512
PAD_ID = 0
TOKENIZER_FILE = "tokenizer.json"


def clean_text(text: str) -> str:
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def resolve_tokenizer_file(path: str | Path) -> Path:
    """`path` itself when it is a file, else the tokenizer.json inside the folder `path`."""
    path = Path(path)
    candidate = path / TOKENIZER_FILE if path.is_dir() else path
    if candidate.is_file():
        return candidate
    if not path.exists():
        problem = "no such file or folder"
    elif (path / "spiece.model").is_file():
        problem = ("the folder holds only the SentencePiece spiece.model; write its tokenizer.json once with "
                   "transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    else:
        problem = f"the folder has no {TOKENIZER_FILE}"
    raise ValueError(
        f"cannot load the umT5 tokenizer from {str(path)!r}: {problem}. Point the recipe's tokenizer at a "
        f"{TOKENIZER_FILE} file or a folder holding one (for Wan: the google/umt5-xxl folder shipped with the checkpoint)."
    )


class UMT5Tokenizer:
    def __init__(self, path: str | Path, text_len: int = TEXT_LEN) -> None:
        self.path = resolve_tokenizer_file(path)
        self.text_len = text_len
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the tokenizers library raises a bare Exception for unreadable JSON
            raise ValueError(f"cannot load the umT5 tokenizer {str(self.path)!r}: not a tokenizers JSON file ({exc})") from exc
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
