"""Synthetic retrieval tasks in RULER's prompt format, with needles inserted into a real-text haystack.

Each generator builds one sample of exactly ``length`` tokens for any tokenizer:
``prompt head + haystack with needles + question + answer prefix + answer``. The haystack is the
given real text (token ids), cut to fill the length; needles go in after sentence ends nearest their
depth. Everything is drawn from the ``rng`` passed in, so a sample is a pure function of its seed.

- ``s_niah`` (RULER niah_single_2): one "adjective-noun" key, one 7-digit value.
- ``mq_niah`` (RULER niah_multiquery): four keys with one value each, all four queried.
- ``vt`` (RULER vt): one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of four hops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from hsa_lightning.data.tokenizer import Tokenizer

ADJECTIVES = (
    "amber brave calm dusty eager faint gentle hollow icy jolly keen lively misty narrow odd pale quiet rapid "
    "silent tidy upper vivid warm young zesty bitter crisp early frozen golden hidden lunar"
).split()
NOUNS = (
    "anchor badger candle dragon engine falcon garden harbor island jacket kettle lantern meadow needle "
    "orchard pencil quarry river saddle temple umbrella valley window yard zebra beacon canyon ferry glacier"
).split()

NIAH_HEAD = ("{some} special magic {kind} {are} hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {kind} afterwards.\n")
NIAH_NEEDLE = " One of the special magic {kind1} for {key} is: {value}. "
NIAH_QUESTION = ("\nWhat {are_all} special magic {kind} for {query} mentioned in the provided text? "
                 "The special magic {kind} for {query} mentioned in the provided text {are}")
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. "
               "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
               "assgined the value {value}, they are:")  # "assgined" is RULER's spelling


@dataclass
class TaskSample:
    task: str
    tokens: np.ndarray  # (length,) int64
    answer_start: int  # answer tokens are tokens[answer_start:answer_end]
    answer_end: int
    answers: list[str]  # reference strings (each must appear in a correct generation)
    needle_starts: list[int]  # token offset of every needle


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _insert(hay: np.ndarray, needles: list[list[int]], depths: list[float], ends: frozenset[int]):
    """Insert needles (in order) after the sentence end nearest each depth; returns tokens and needle offsets."""
    cuts = np.flatnonzero(np.isin(hay, list(ends))) + 1 if ends else np.zeros(0, dtype=np.int64)
    cuts = np.concatenate([[0], cuts, [len(hay)]])
    at = sorted(int(cuts[np.abs(cuts - d * len(hay)).argmin()]) for d in depths)
    pieces, starts, prev, shift = [], [], 0, 0
    for pos, needle in zip(at, needles):
        pieces.append(hay[prev:pos])
        starts.append(pos + shift)
        pieces.append(np.asarray(needle, dtype=np.int64))
        prev, shift = pos, shift + len(needle)
    pieces.append(hay[prev:])
    return np.concatenate(pieces), starts


def _assemble(task: str, tok: Tokenizer, haystack: np.ndarray, length: int, rng: np.random.Generator,
              head: str, needles: list[str], question: str, answer: str, answers: list[str]) -> TaskSample:
    head_ids, question_ids, answer_ids = tok.encode(head), tok.encode(question), tok.encode(answer)
    needle_ids = [tok.encode(n) for n in needles]
    fill = length - len(head_ids) - len(question_ids) - len(answer_ids) - sum(map(len, needle_ids))
    if fill < 0:
        raise ValueError(f"task {task!r} takes {length - fill} tokens before any haystack, more than length={length}")
    hay = haystack[~np.isin(haystack, [tok.doc_sep, tok.pad])].astype(np.int64)
    if len(hay) == 0:
        hay = np.asarray(tok.encode(" "), dtype=np.int64)
    hay = np.resize(hay, fill)  # repeats a too-short haystack
    depths = sorted(float(d) for d in rng.random(len(needles)))
    context, starts = _insert(hay, needle_ids, depths, tok.sentence_ends)
    tokens = np.concatenate([head_ids, context, question_ids, answer_ids]).astype(np.int64)
    starts = [s + len(head_ids) for s in starts]
    return TaskSample(task, tokens, length - len(answer_ids), length, answers, starts)


def _word_key(rng: np.random.Generator) -> str:
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"


def _niah(task: str, n_keys: int, tok: Tokenizer, haystack: np.ndarray, length: int,
          rng: np.random.Generator) -> TaskSample:
    keys: list[str] = []
    while len(keys) < n_keys:
        key = _word_key(rng)
        if key not in keys:
            keys.append(key)
    values = [str(int(v)) for v in rng.integers(1_000_000, 10_000_000, size=n_keys)]
    one = n_keys == 1
    kind = "number" if one else "numbers"
    head = NIAH_HEAD.format(some="A" if one else "Some", kind=kind, are="is" if one else "are")
    needles = [NIAH_NEEDLE.format(kind1="numbers", key=k, value=v) for k, v in zip(keys, values)]
    question = NIAH_QUESTION.format(are_all="is the" if one else "are all the", kind=kind,
                                    query=_join_keys(keys), are="is" if one else "are")
    return _assemble(task, tok, haystack, length, rng, head, needles, question, " " + ", ".join(values) + ".", values)


def s_niah(tok: Tokenizer, haystack: np.ndarray, length: int, rng: np.random.Generator) -> TaskSample:
    return _niah("s_niah", 1, tok, haystack, length, rng)


def mq_niah(tok: Tokenizer, haystack: np.ndarray, length: int, rng: np.random.Generator) -> TaskSample:
    return _niah("mq_niah", 4, tok, haystack, length, rng)


def vt(tok: Tokenizer, haystack: np.ndarray, length: int, rng: np.random.Generator, hops: int = 4) -> TaskSample:
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(letters, 5))
        if name not in names:
            names.append(name)
    value = str(int(rng.integers(10_000, 100_000)))
    chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    question = VT_QUESTION.format(value=value, n=len(names))
    return _assemble("vt", tok, haystack, length, rng, VT_HEAD, chain, question, " " + " ".join(names), names)


TASKS: dict[str, Callable[..., TaskSample]] = {"s_niah": s_niah, "mq_niah": mq_niah, "vt": vt}
