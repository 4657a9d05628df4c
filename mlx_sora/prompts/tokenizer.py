"""The T5 tokenizer, as Open-Sora calls it: sentencepiece + ``</s>``, truncated and padded to 300.

Open-Sora 1.2 (``opensora/models/text_encoder/t5.py: T5Embedder.get_text_embeddings``) calls the
Hugging Face tokenizer with ``max_length=300, padding="max_length", truncation=True,
add_special_tokens=True``. For T5 that is:

* the text is split on the special tokens written literally in it (``<pad>``, ``</s>``, ``<unk>``,
  ``<extra_id_0>`` .. ``<extra_id_99>``), which map to their ids; every other chunk is encoded by
  sentencepiece (``spiece.model``: NFKC normalisation, whitespace collapsing, a leading "▁");
* ``</s>`` (id 1) is appended; a longer sequence keeps its first ``max_length - 1`` tokens and
  still ends with ``</s>``;
* the ids are right-padded with ``<pad>`` (id 0); ``attention_mask`` is 1 on the real tokens.

The 100 sentinel ids ``<extra_id_i>`` follow the sentencepiece vocabulary in reverse order
(``<extra_id_0>`` is the last id), as in transformers.

Known difference: transformers matches special tokens before normalisation, so a prompt holding a
compatibility form of one (e.g. full-width ``＜/s＞``) is tokenized as text by both; neither form
survives Open-Sora's caption cleaning (BeautifulSoup strips tags) anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPIECE_NAME = "spiece.model"


@dataclass(frozen=True)
class TokenizedText:
    """A tokenized batch: ``input_ids`` and ``attention_mask`` are int64 arrays [B, max_length]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    num_tokens: np.ndarray
    """Tokens of each prompt (with ``</s>``) before truncation, [B]."""

    @property
    def truncated(self) -> np.ndarray:
        """Which prompts lost tokens to truncation, bool [B]."""
        return self.num_tokens > self.input_ids.shape[1]


class T5Tokenizer:
    """Sentencepiece T5 tokenizer equal to ``transformers.T5Tokenizer`` for Open-Sora's call."""

    def __init__(self, spiece_model: str | Path, extra_ids: int = 100, max_length: int = 300):
        import sentencepiece as spm

        path = Path(spiece_model)
        if not path.is_file():
            raise FileNotFoundError(
                f"sentencepiece model {path} not found; it is copied into the converted T5 folder "
                f"(as {SPIECE_NAME}) by `python -m mlx_sora.convert`"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a valid sentencepiece model ({e})") from e
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.extra_ids = extra_ids
        pieces = self.sp.get_piece_size()
        self.special_ids: dict[str, int] = {}
        for token in ("<pad>", "</s>", "<unk>"):
            token_id = self.sp.piece_to_id(token)
            if self.sp.id_to_piece(token_id) != token:
                raise ValueError(f"{path} has no {token} piece: not a T5 sentencepiece model")
            self.special_ids[token] = token_id
        for i in range(extra_ids):
            self.special_ids[f"<extra_id_{i}>"] = pieces + extra_ids - 1 - i
        self.pad_id = self.special_ids["<pad>"]
        self.eos_id = self.special_ids["</s>"]
        self.vocab_size = pieces + extra_ids
        # longest first, so that no special token is matched by a prefix of another
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> "T5Tokenizer":
        """The tokenizer of a converted T5 folder (or of a Hugging Face T5 snapshot)."""
        return cls(Path(folder) / SPIECE_NAME, **kwargs)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``</s>``, truncation or padding."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for i, chunk in enumerate(self._special_pattern.split(text)):
            if i % 2:
                ids.append(self.special_ids[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> TokenizedText:
        """Tokenize one prompt or a batch, padded to ``max_length`` (default 300)."""
        if isinstance(texts, str):
            texts = [texts]
        max_length = self.max_length if max_length is None else max_length
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        input_ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(texts), max_length), dtype=np.int64)
        num_tokens = np.zeros(len(texts), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            num_tokens[row] = len(ids) + 1
            ids = ids[: max_length - 1] + [self.eos_id]
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return TokenizedText(input_ids, attention_mask, num_tokens)
