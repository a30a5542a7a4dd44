"""Byte-level tokenizer: no files, ids 0-255 are UTF-8 bytes, then the special tokens."""
from __future__ import annotations


class ByteTokenizer:
    doc_sep = 256  # document separator, between packed documents
    pad = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
