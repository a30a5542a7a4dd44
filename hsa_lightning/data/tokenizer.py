"""Tokenizers: byte-level (no files), any HF ``tokenizer.json``, and a byte-level BPE trained here.

Every tokenizer has two specials: ``doc_sep`` (between packed documents) and ``pad``. Its
``fingerprint`` names it exactly (kind + vocabulary hash), so shards remember what wrote them and a
DataModule refuses shards written with another tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

from hsa_lightning.data.atomic import atomic_file
from hsa_lightning.errors import ConfigError

DOC_SEP_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class Tokenizer:
    """The interface the data pipeline uses."""

    name: str
    vocab_size: int
    doc_sep: int
    pad: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @cached_property
    def sentence_ends(self) -> frozenset[int]:
        """Ids whose text ends a sentence or line: where synthetic needles may be inserted."""
        ends = set()
        for i in range(self.vocab_size):
            if i in (self.doc_sep, self.pad):
                continue
            s = self.decode([i]).rstrip(" ")
            if s.endswith((".", "!", "?", "\n")):
                ends.add(i)
        return frozenset(ends)


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are UTF-8 bytes, then the specials."""

    name = "byte"
    doc_sep = 256
    pad = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        return "byte:258"


class HFTokenizer(Tokenizer):
    """A HuggingFace ``tokenizer.json``. Missing specials (``<|endoftext|>``, ``<|pad|>``) are appended."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"tokenizer file {str(self.path)!r} does not exist; give 'byte' or a tokenizer.json path")
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad json
            raise ConfigError(f"tokenizer file {str(self.path)!r} is not a valid tokenizer.json: {e}") from e
        self._tok.add_special_tokens([DOC_SEP_TOKEN, PAD_TOKEN])  # no-op for those already present
        self.doc_sep = self._tok.token_to_id(DOC_SEP_TOKEN)
        self.pad = self._tok.token_to_id(PAD_TOKEN)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.name = self.path.name

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @cached_property
    def fingerprint(self) -> str:
        vocab = json.dumps(sorted(self._tok.get_vocab(with_added_tokens=True).items()), ensure_ascii=False)
        return f"hf:{self.vocab_size}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or the path of a ``tokenizer.json``."""
    if spec == "byte":
        return ByteTokenizer()
    if not str(spec).endswith(".json"):
        raise ConfigError(f"tokenizer={spec!r} must be 'byte' or the path of a tokenizer.json file")
    return HFTokenizer(spec)


def train_bpe(texts: Iterator[str], vocab_size: int, output: str | Path) -> HFTokenizer:
    """Train a byte-level BPE with digits split one per token; specials ``<|endoftext|>`` (id 0), ``<|pad|>`` (1)."""
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ConfigError(f"vocab_size={vocab_size} must be >= 300 (256 byte symbols + specials + merges)")
    tok = _HF(models.BPE())
    # Digits first, one per token, so 7-digit needle values tokenise uniformly.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[DOC_SEP_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    output = Path(output)
    with atomic_file(output) as partial:  # a killed run never leaves a truncated tokenizer.json
        tok.save(str(partial))
    return HFTokenizer(output)
