"""WordPiece tokenisation into the model's text input: `[CLS] text [SEP]`, padded with [PAD] = 0.

The tokenizer is read from a local Hugging Face directory (BERT-base, MiniLM, or any folder with a BERT
`vocab.txt`); nothing is downloaded. Text is truncated to `max_length - 2` word pieces as the reference does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertTokenizerFast  # transformers 5: the tokenizers-backed BertTokenizer

from tasks.errors import ConfigError


@dataclass
class TextInput:
    """Token ids, attention mask and segment ids, each `[N, max_length]` int64."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The model's text inputs: input_ids, attention_mask, token_type_ids as int64 tensors on `device`."""
        return {name: torch.from_numpy(getattr(self, name)).to(device)
                for name in ("input_ids", "attention_mask", "token_type_ids")}


class Tokenizer:
    """A BERT WordPiece tokenizer from a local directory, with the special ids the masking code needs."""

    def __init__(self, directory: str | os.PathLike, lowercase: bool = True):

        directory = Path(directory)
        if not (directory / "vocab.txt").is_file() and not (directory / "tokenizer.json").is_file():
            raise ConfigError(f"{directory}: no vocab.txt or tokenizer.json (a local BERT tokenizer directory)")
        self.directory = directory
        self.backend = BertTokenizerFast.from_pretrained(str(directory), do_lower_case=lowercase)
        for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
            if getattr(self.backend, name) is None:
                raise ConfigError(f"{directory}: the vocabulary has no {name.removesuffix('_id')}")
        self.cls_id = self.backend.cls_token_id
        self.sep_id = self.backend.sep_token_id
        self.pad_id = self.backend.pad_token_id
        self.mask_id = self.backend.mask_token_id
        self.special_ids = frozenset(self.backend.all_special_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    def encode(self, texts: str | list[str], max_length: int) -> TextInput:
        """Tokenise one text or a list into `[CLS] pieces [SEP]` arrays of exactly `max_length`."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ConfigError(f"max text length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        encoded = self.backend(
            list(texts),
            max_length=max_length,
            padding="max_length",
            truncation=True,
            return_tensors="np",
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        return TextInput(
            input_ids=encoded["input_ids"].astype(np.int64),
            attention_mask=encoded["attention_mask"].astype(np.int64),
            token_type_ids=encoded["token_type_ids"].astype(np.int64),
        )

    def last_tokens(self, text: str, spans: list[tuple[int, int]], max_length: int) -> list[int | None]:
        """For each character span [start, end) of `text`, the position in `encode(text, max_length)` of the last
        word piece inside it (a phrase's head word), None where truncation dropped it."""
        offsets = self.backend(text, max_length=max_length, truncation=True, return_offsets_mapping=True,
                               add_special_tokens=True)["offset_mapping"]
        found = []
        for start, end in spans:
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and start <= a and b <= end]
            found.append(inside[-1] if inside else None)
        return found

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(directory: str | os.PathLike, lowercase: bool = True) -> Tokenizer:
    """The tokenizer in `directory` (a ConfigError naming the directory if it has none)."""
    return Tokenizer(directory, lowercase=lowercase)
