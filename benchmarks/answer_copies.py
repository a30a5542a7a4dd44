"""Which answer tokens does a model fail to copy? An analysis of an evaluation's S-NIAH samples (not a test).

Regenerates each S-NIAH sample of a ``LengthEval`` folder from its settings (the same tokenizer and haystack
must be on disk: every key is checked against the recorded answer), then tabulates the later answer tokens
(each copies the successor of the one before) by how often the token occurs in a training corpus and by
whether its source starts a new memory chunk; the first answer token (finding the needle) beside them, by
count. Prints a markdown table.

    python benchmarks/answer_copies.py docs/results/c16_seed1_again --chunk_size 16 --corpus data/demo/train
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

BANDS = ((0, 10, "< 10"), (10, 100, "10-99"), (100, 1000, "100-999"), (1000, None, ">= 1000"))


def token_counts(tok, corpus: str) -> np.ndarray:
    """Occurrences of every token id in the corpus's documents (files, folders or globs, read as
    ``hsa_lightning.data`` reads them to train the tokenizer)."""
    from hsa_lightning.data.corpus import find_sources, read_documents

    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for path in find_sources([corpus]):
        for ids in tok.encode_batch(list(read_documents(path))):
            np.add.at(counts, np.asarray(ids, dtype=np.int64), 1)
    return counts


def band(count: int) -> str:
    return next(name for lo, hi, name in BANDS if count >= lo and (hi is None or count < hi))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dir", help="a LengthEval output folder (results.json, samples.jsonl)")
    p.add_argument("--chunk_size", type=int, required=True, help="the model's memory chunk size")
    p.add_argument("--corpus", default="data/demo/train", help="the training text: files, a folder or a glob")
    args = p.parse_args(argv)
    from hsa_lightning.data.tokenizer import load_tokenizer
    from hsa_lightning.eval.datamodule import Cell, LengthEvalData

    folder = Path(args.eval_dir)
    settings = json.loads((folder / "results.json").read_text())["settings"]
    settings = settings["merged"][0] if "merged" in settings else settings  # parts share these three
    # a sample is a function of its cell, its index, the seed, the tokenizer and the haystack only
    data = LengthEvalData(**{k: settings[k] for k in ("tokenizer", "haystack", "seed")}, tasks=["s_niah"],
                          depth_tasks=["s_niah"], lengths=[1024], ppl_lengths=[])
    data.setup("test")
    tok = load_tokenizer(settings["tokenizer"])
    counts = token_counts(tok, args.corpus)
    cells: dict = defaultdict(lambda: [0, 0])
    for line in (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["task"] != "s_niah":
            continue
        s = data.sample(Cell("s_niah", r["length"], r["depth"]), r["index"])
        key = s["input_ids"][s["answer_start"]:s["answer_end"]].tolist()
        if tok.decode(key) != r["answers"][0]:
            sys.exit(f"error: sample {r['length']}/{r['depth']}/{r['index']} regenerates another key: the tokenizer "
                     f"or haystack on disk is not the one {folder} was evaluated with")
        for i in range(len(key)):
            where = ("first" if i == 0 else
                     "starts a chunk" if s["answer_sources"][i] % args.chunk_size == 0 else "inside a chunk")
            cell = cells[(band(int(counts[key[i]])), where)]
            cell[0] += r["answer_token_correct"][i]
            cell[1] += 1
    print(f"S-NIAH answer tokens right, % (n), {folder}: by the token's count in {args.corpus} "
          f"({int(counts.sum()):,} tokens); later tokens also by their source's place in the chunk of "
          f"{args.chunk_size}\n")
    print("| count in the corpus | first token | later, inside a chunk | later, starts a chunk |\n|---|---|---|---|")
    for _, _, name in BANDS:
        row = [cells.get((name, w)) for w in ("first", "inside a chunk", "starts a chunk")]
        print(f"| {name} | " + " | ".join(f"{100 * c / n:.0f} ({n})" if (c, n) != (0, 0) else "-"
                                         for c, n in (x or (0, 0) for x in row)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
