"""BAGEL's text tokenizer: the Qwen2 byte-level BPE, read from `tokenizer.json`.

The official code uses the slow `Qwen2Tokenizer` from `transformers`; we read the same
vocabulary through the `tokenizers` library, which gives the same ids and strings (spec 8)
without depending on `transformers`. What the official code relies on, and this module copies:

* `encode` adds no BOS/EOS and NFC-normalises first (the slow class always does, whatever
  `tokenizer.json` declares); BAGEL wraps every text item itself as
  `<|im_start|> text <|im_end|>` (spec 7.1), which is `text_segment`.
* `decode` keeps special tokens, replaces invalid UTF-8 and does no whitespace clean-up.
* The four ids BAGEL needs (`new_token_ids`, spec 8) are looked up by token string when the
  tokenizer is loaded, never hard-coded: they are 151644/151645/151652/151653 for the real
  Qwen2.5 vocabulary and different for tiny test vocabularies.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
START_OF_IMAGE_TOKEN = "<|vision_start|>"
END_OF_IMAGE_TOKEN = "<|vision_end|>"


class BagelTokenizer:
    """Encode and decode text the way BAGEL's inference does, with its four structural ids.

    Attributes:
        bos_id: `<|im_start|>`, opens every text segment and is the first decoding query.
        eos_id: `<|im_end|>`, closes every text segment and stops text generation.
        start_of_image: `<|vision_start|>`, opens every ViT, VAE or generated-image block.
        end_of_image: `<|vision_end|>`, closes it.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "<in memory>") -> None:
        self._tokenizer = tokenizer
        self.bos_id: int = self._require_id(BOS_TOKEN, source)
        self.eos_id: int = self._require_id(EOS_TOKEN, source)
        self.start_of_image: int = self._require_id(START_OF_IMAGE_TOKEN, source)
        self.end_of_image: int = self._require_id(END_OF_IMAGE_TOKEN, source)

    @classmethod
    def from_folder(cls, folder: Path) -> "BagelTokenizer":
        """Load `tokenizer.json` from a checkpoint folder in the official Qwen2 layout."""
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the checkpoint folder must hold the Qwen2 tokenizer.json")
        return cls(Tokenizer.from_file(str(path)), source=str(path))

    def _require_id(self, token: str, source: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{source}: tokenizer has no {token!r} token, which BAGEL needs (spec 8)")
        return token_id

    @property
    def vocab_len(self) -> int:
        """Number of entries, added tokens included (`len(tokenizer)`: 151,665 for Qwen2.5).

        Smaller than the model's embedding rows (152,064), which are padded."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def new_token_ids(self) -> dict[str, int]:
        """The official `new_token_ids` dictionary (`data/data_utils.py:add_special_tokens`)."""
        return {
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "start_of_image": self.start_of_image,
            "end_of_image": self.end_of_image,
        }

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for: a text of n bytes (after NFC) is at least
        n / max_token_bytes tokens, which bounds a prompt's length without tokenizing it.
        Byte-level BPE writes one vocabulary character per byte; added tokens are their text."""
        added = self._tokenizer.get_added_tokens_decoder()
        longest_added = max((len(t.content.encode("utf-8")) for t in added.values()), default=1)
        plain = (token for token, i in self._tokenizer.get_vocab(with_added_tokens=False).items() if i not in added)
        return max(longest_added, max((len(token) for token in plain), default=1))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added (`tokenizer.encode(text)` in the official code).

        Special-token strings written in `text` still map to their ids, as in the official
        tokenizer. NFC comes first, as `Qwen2Tokenizer.prepare_for_tokenization` does, so the
        result matches the slow class even where a combining mark follows a special token."""
        normalized = unicodedata.normalize("NFC", text)
        return self._tokenizer.encode(normalized, add_special_tokens=False).ids

    def text_segment(self, text: str) -> list[int]:
        """`[<|im_start|>] + encode(text) + [<|im_end|>]`: one text item of a BAGEL context (spec 7.1)."""
        return [self.bos_id, *self.encode(text), self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens kept, invalid UTF-8 replaced by U+FFFD and no
        whitespace clean-up (the official `tokenizer.decode(ids)`)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_len]
        if bad:
            # The model's head is wider than the vocabulary; the official decode fails on such
            # ids too, and dropping them silently would hide a sampling bug.
            raise ValueError(f"token ids {bad[:8]} are outside the tokenizer's {self.vocab_len} entries")
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def clean_generated_text(decoded: str) -> str:
    """The official post-processing of generated text (`gen_text`, `inferencer.py`; spec 7.2).

    `decoded` is `decode` of the emitted ids, which start with `<|im_start|>`. The official code
    keeps what comes before the first `<|im_end|>`, then what lies between the first and second
    `<|im_start|>` of that: `decoded.split('<|im_end|>')[0].split('<|im_start|>')[1]`.
    """
    parts = decoded.split(EOS_TOKEN)[0].split(BOS_TOKEN)
    if len(parts) < 2:
        raise ValueError(f"generated text has no {BOS_TOKEN!r} before its first {EOS_TOKEN!r}: {decoded[:80]!r}")
    return parts[1]
