"""Synthetic retrieval tasks over a real-text haystack, for the training mix and the evaluation suite.

Each generator builds one sample of exactly ``length`` tokens for any tokenizer:
``head + haystack with needles + question + answer``. The haystack is the given real text (token ids),
cut (or repeated) to fill the length; needles go in after the sentence end nearest their depth.
Everything is drawn from the ``rng`` passed in, so a sample is a pure function of its seed. ``depth``
(0..1, single-needle tasks) fixes where the needle goes instead of drawing it.

The paper's token-space tasks (HSA-UltraLong's RULER synthesizer; needles fenced by ``|``):
- ``s_niah``: 7 random token ids after a fixed needle phrase; the answer is the 7 ids.
- ``mq_niah``: 6 key-value needles (5-letter keys, 6-digit values), 2 keys queried.
- ``mv_niah``: one key with 4 values; all 4 are the answer, in order of appearance.
- ``vt``: 2 chains of 3 variables (``VAR A = 12345678``, ``VAR B = A``, ``VAR C = B``); one chain queried.
- ``passkey``: Landmark Attention's pass key (an integer in 1..50000), stated and repeated once.

RULER's text variants (``niah_single_2``, ``niah_multiquery``, ``niah_multivalue``, ``ruler_vt``) use
RULER's prompts, adjective-noun keys and 7-digit values, for comparison with the literature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    needle_ends: list[int]  # one past its last token
    # where each answer token is copied from, when the answer is a run of one needle's tokens (S-NIAH's key,
    # the pass key); empty otherwise. Tells a copy inside a memory chunk from one that starts the next chunk.
    answer_sources: list[int] = field(default_factory=list)


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
              head: list[int], needles: list[list[int]], question: list[int], answer: list[int], answers: list[str],
              depth: float | None = None) -> TaskSample:
    fill = length - len(head) - len(question) - len(answer) - sum(map(len, needles))
    if fill < 0:
        raise ValueError(f"task {task!r} takes {length - fill} tokens before any haystack, more than length={length}")
    hay = haystack[~np.isin(haystack, [tok.doc_sep, tok.pad])].astype(np.int64)
    if len(hay) == 0:
        hay = np.asarray(tok.encode(" "), dtype=np.int64)
    hay = np.resize(hay, fill)  # repeats a too-short haystack
    if depth is None:
        depths = sorted(float(d) for d in rng.random(len(needles)))
    elif len(needles) == 1 and 0.0 <= depth <= 1.0:
        depths = [depth]
    else:
        raise ValueError(f"task {task!r}: depth={depth} needs a single-needle task and 0 <= depth <= 1")
    context, starts = _insert(hay, needles, depths, tok.sentence_ends)
    tokens = np.concatenate([head, context, question, answer]).astype(np.int64)
    starts = [st + len(head) for st in starts]
    ends = [st + len(n) for st, n in zip(starts, needles)]
    return TaskSample(task, tokens, length - len(answer), length, answers, starts, ends, _sources(needles, starts, answer))


def _sources(needles: list[list[int]], starts: list[int], answer: list[int]) -> list[int]:
    """The positions the answer is copied from: its first occurrence inside one needle, else none."""
    n = len(answer)
    for needle, start in zip(needles, starts):
        for at in range(len(needle) - n + 1):
            if list(needle[at:at + n]) == list(answer):
                return [start + at + i for i in range(n)]
    return []


def _text(task: str, tok: Tokenizer, haystack: np.ndarray, length: int, rng: np.random.Generator, head: str,
          needles: list[str], question: str, answer: str, answers: list[str], depth: float | None = None):
    return _assemble(task, tok, haystack, length, rng, tok.encode(head), [tok.encode(n) for n in needles],
                     tok.encode(question), tok.encode(answer), answers, depth)


def _distinct(draw: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _word_key(rng: np.random.Generator) -> str:
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"


def _letters(rng: np.random.Generator, n: int = 5) -> str:
    return "".join(rng.choice(np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")), n))


# -- RULER's text variants ------------------------------------------------------------------------
def _ruler_niah(task: str, n_keys: int, n_values: int, tok: Tokenizer, haystack: np.ndarray, length: int,
                rng: np.random.Generator, depth: float | None = None) -> TaskSample:
    keys = _distinct(lambda: _word_key(rng), n_keys)
    values = [str(int(v)) for v in rng.integers(1_000_000, 10_000_000, size=n_keys * n_values)]
    one = len(values) == 1
    kind = "number" if one else "numbers"
    head = NIAH_HEAD.format(some="A" if one else "Some", kind=kind, are="is" if one else "are")
    pairs = [(keys[i // n_values], v) for i, v in enumerate(values)]
    needles = [NIAH_NEEDLE.format(kind1="numbers", key=k, value=v) for k, v in pairs]
    question = NIAH_QUESTION.format(are_all="is the" if one else "are all the", kind=kind,
                                    query=_join_keys(keys), are="is" if one else "are")
    return _text(task, tok, haystack, length, rng, head, needles, question, " " + ", ".join(values) + ".", values,
                 depth)


def niah_single_2(tok, haystack, length, rng, depth=None) -> TaskSample:
    return _ruler_niah("niah_single_2", 1, 1, tok, haystack, length, rng, depth)


def niah_multiquery(tok, haystack, length, rng, depth=None) -> TaskSample:
    return _ruler_niah("niah_multiquery", 4, 1, tok, haystack, length, rng, depth)


def niah_multivalue(tok, haystack, length, rng, depth=None) -> TaskSample:
    return _ruler_niah("niah_multivalue", 1, 4, tok, haystack, length, rng, depth)


def ruler_vt(tok, haystack, length, rng, depth=None, hops: int = 4) -> TaskSample:
    names = _distinct(lambda: _letters(rng), hops + 1)
    value = str(int(rng.integers(10_000, 100_000)))
    chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    question = VT_QUESTION.format(value=value, n=len(names))
    return _text("ruler_vt", tok, haystack, length, rng, VT_HEAD, chain, question, " " + " ".join(names), names, depth)


# -- the paper's token-space tasks ----------------------------------------------------------------
S_NIAH_NEEDLE = " |One of the special magic numbers for long-context is:"
S_NIAH_QUESTION = " What is the special magic number for long-context mentioned in the provided text? Answer: "
KV_NEEDLE = "| One of the special magic numbers for {key} is {value}.|"
KV_QUESTION = " What are all the special magic numbers for {keys} mentioned in the provided text? Answer:"
PASSKEY_NEEDLE = "|The pass key is {key}. Remember it. {key} is the pass key.|"
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def _random_ids(tok: Tokenizer, n: int, rng: np.random.Generator) -> list[int]:
    """Token ids drawn from [100, vocab) without the separator and padding ids (the paper's key)."""
    pool = np.setdiff1d(np.arange(100, tok.vocab_size), [tok.doc_sep, tok.pad])
    return [int(i) for i in rng.choice(pool, n)]


def s_niah(tok, haystack, length, rng, depth=None) -> TaskSample:
    key = _random_ids(tok, 7, rng)
    needle = tok.encode(S_NIAH_NEEDLE) + key + tok.encode("|")
    return _assemble("s_niah", tok, haystack, length, rng, [], [needle], tok.encode(S_NIAH_QUESTION), key,
                     [tok.decode(key)], depth)


def _kv_task(task: str, keys: list[str], values: list[str], queried: list[str], answers: list[str], tok, haystack,
             length, rng, depth) -> TaskSample:
    needles = [KV_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    question = KV_QUESTION.format(keys=" and ".join(queried))
    return _text(task, tok, haystack, length, rng, "", needles, question, " " + " ".join(answers), answers, depth)


def mq_niah(tok, haystack, length, rng, depth=None) -> TaskSample:
    keys = _distinct(lambda: _letters(rng), 6)
    values = [str(int(v)) for v in rng.integers(100_000, 1_000_000, size=6)]
    asked = sorted(int(i) for i in rng.choice(6, 2, replace=False))
    return _kv_task("mq_niah", keys, values, [keys[i] for i in asked], [values[i] for i in asked], tok, haystack,
                    length, rng, depth)


def mv_niah(tok, haystack, length, rng, depth=None) -> TaskSample:
    key = _letters(rng)
    values = _distinct(lambda: str(int(rng.integers(100_000, 1_000_000))), 4)
    return _kv_task("mv_niah", [key] * 4, values, [key], values, tok, haystack, length, rng, depth)


def vt(tok, haystack, length, rng, depth=None, chains: int = 2, hops: int = 2) -> TaskSample:
    names = _distinct(lambda: _letters(rng), chains * (hops + 1))
    values = _distinct(lambda: str(int(rng.integers(10_000_000, 100_000_000))), chains)
    statements = []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        statements.append([f"|VAR {chain[0]} = {values[c]}|"] + [f"|VAR {b} = {a}|" for a, b in zip(chain, chain[1:])])
    # interleave the chains at random, each in its own order
    order = rng.permutation(np.repeat(np.arange(chains), hops + 1))
    needles = [statements[c].pop(0) for c in order]
    answer_names = names[: hops + 1]  # the first chain is queried
    question = f" Find all variables that are assigned the value {values[0]}. Answer:"
    return _text("vt", tok, haystack, length, rng, "", needles, question, " " + ", ".join(answer_names),
                 answer_names, depth)


def passkey(tok, haystack, length, rng, depth=None) -> TaskSample:
    key = str(int(rng.integers(1, 50_001)))
    return _text("passkey", tok, haystack, length, rng, "", [PASSKEY_NEEDLE.format(key=key)], PASSKEY_QUESTION,
                 " " + key, [key], depth)


TASKS: dict[str, Callable[..., TaskSample]] = {
    "s_niah": s_niah, "mq_niah": mq_niah, "mv_niah": mv_niah, "vt": vt, "passkey": passkey,
    "niah_single_2": niah_single_2, "niah_multiquery": niah_multiquery, "niah_multivalue": niah_multivalue,
    "ruler_vt": ruler_vt,
}
"""Every generator by name: the paper's token-space tasks, then RULER's text variants."""
