"""A seeded synthetic corpus: generated prose as the haystack, with needle/answer documents mixed in.

No files, no network. Block ``i`` of a split is generated from the RNG seeded by (seed, split, i), so
any block can be produced on its own: the stream is reproducible and trivially resumable. Documents are
packed back to back with a separator and cut at the block length.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hsa_lightning.data.tokenizer import ByteTokenizer

NEEDLE = " The special magic number for long-context is: {key}. "
QUESTION = " What is the special magic number for long-context mentioned in the provided text? Answer: "


@dataclass
class NeedleDoc:
    tokens: list[int]
    key: str
    needle_start: int  # token offset of the needle phrase
    answer_start: int  # token offset of the answer key at the end


class Haystack:
    """Sentences of pseudo-words drawn with Zipf frequencies from a vocabulary fixed by the seed."""

    def __init__(self, seed: int = 0, n_words: int = 600):
        rng = np.random.default_rng([seed, 7919])
        onsets = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "ch"]
        vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
        words = set()
        while len(words) < n_words:
            n_syl = int(rng.integers(1, 4))
            words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n_syl)))
        self.words = sorted(words)
        ranks = np.arange(1, n_words + 1)
        self.p = (1.0 / ranks) / (1.0 / ranks).sum()

    def text(self, rng: np.random.Generator, n_chars: int) -> str:
        out: list[str] = []
        size = 0
        while size < n_chars:
            n = int(rng.integers(5, 13))
            words = list(rng.choice(self.words, size=n, p=self.p))
            sentence = " ".join(words).capitalize() + ". "
            out.append(sentence)
            size += len(sentence)
        return "".join(out)[:n_chars]


def needle_document(rng: np.random.Generator, haystack: Haystack, tok: ByteTokenizer,
                    n_tokens: int, depth: float) -> NeedleDoc:
    """A haystack of about ``n_tokens`` with the needle at relative ``depth``, then question + answer."""
    key = "".join(str(d) for d in rng.integers(0, 10, size=7))
    needle, question, answer = tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION), tok.encode(key)
    filler = max(n_tokens - len(needle) - len(question) - len(answer), 0)
    hay = tok.encode(haystack.text(rng, filler))
    at = int(round(depth * len(hay)))
    tokens = hay[:at] + needle + hay[at:] + question
    return NeedleDoc(tokens + answer, key, at, len(tokens))


def packed_block(seed: int, split: int, index: int, seq_len: int, needle_share: float,
                 haystack: Haystack, tok: ByteTokenizer) -> np.ndarray:
    """``seq_len + 1`` tokens of documents separated by ``doc_sep`` (inputs and shifted labels)."""
    rng = np.random.default_rng([seed, split, index])
    tokens: list[int] = []
    while len(tokens) < seq_len + 1:
        if rng.random() < needle_share:
            n = int(rng.integers(seq_len // 2, seq_len + 1))
            tokens += needle_document(rng, haystack, tok, n, float(rng.random())).tokens
        else:
            tokens += tok.encode(haystack.text(rng, int(rng.integers(seq_len // 4, 2 * seq_len))))
        tokens.append(tok.doc_sep)
    return np.asarray(tokens[: seq_len + 1], dtype=np.int64)
