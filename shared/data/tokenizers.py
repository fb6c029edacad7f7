"""Text tokenizers with vocabularies fixed in advance.

A vocabulary built from clients' messages would reveal their words, so neither tokenizer
learns anything from data: ``char`` maps printable ASCII to ids, ``word`` hashes words into
``vocab_size`` buckets (collisions are the price of a data-independent vocabulary).
"""

from __future__ import annotations

import re
import zlib
from typing import Protocol

PAD, BOS, EOS, UNK = 0, 1, 2, 3
N_SPECIAL = 4
_PRINTABLE = [chr(c) for c in range(32, 127)]
_CHAR_IDS = {c: N_SPECIAL + i for i, c in enumerate(_PRINTABLE)}
_WORD_RE = re.compile(r"\w+|[^\w\s]")


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class CharTokenizer:
    """Printable ASCII characters; anything else (emoji, accents) becomes UNK."""

    vocab_size = N_SPECIAL + len(_PRINTABLE)

    def encode(self, text: str) -> list[int]:
        return [_CHAR_IDS.get(c, UNK) for c in text.replace("\n", " ").replace("\t", " ")]

    def decode(self, ids: list[int]) -> str:
        return "".join(_PRINTABLE[i - N_SPECIAL] if i >= N_SPECIAL else "" for i in ids)


class HashWordTokenizer:
    """Lower-cased words and punctuation, hashed (CRC32, stable across processes)."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets
        self.vocab_size = N_SPECIAL + buckets

    def encode(self, text: str) -> list[int]:
        return [N_SPECIAL + zlib.crc32(w.encode("utf-8")) % self.buckets
                for w in _WORD_RE.findall(text.lower())]


def make_tokenizer(name: str, vocab_size: int) -> Tokenizer:
    if name == "char":
        return CharTokenizer()
    if name == "word":
        return HashWordTokenizer(vocab_size)
    raise ValueError(f"unknown tokenizer {name!r}")
