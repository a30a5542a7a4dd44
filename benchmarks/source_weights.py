"""How much fusion weight did the chunk to copy from get, on S-NIAH answer tokens that came out right and wrong?
An analysis of an evaluation's ``samples.jsonl`` (not a test; rows written since session 12 carry
``source_chunk_weight`` and ``copy_starts_chunk``).

Splits the answer tokens by place (the first, finding the needle; a later one copied from inside the chunk
of the token before it; a later one whose source starts the next chunk) and by outcome, and prints per
group the mean weight and the share of tokens whose source chunk had under half of the weight (outweighed
by the other picks: a ranking miss) or at least 0.9 (weighted fully: a miss there is the read's).

    python benchmarks/source_weights.py docs/results/c16_seed1_session14 [--task s_niah]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PLACES = ("first", "inside a chunk", "starts a chunk")


def groups(rows: list[dict]) -> dict[tuple[str, bool], list[float]]:
    """{(place, right): [source chunk weights]} over the answer tokens of ``rows``."""
    out: dict[tuple[str, bool], list[float]] = {(p, c): [] for p in PLACES for c in (True, False)}
    for r in rows:
        weights, right = r["source_chunk_weight"], r["answer_token_correct"]
        places = ["first"] + ["starts a chunk" if edge else "inside a chunk" for edge in r["copy_starts_chunk"]]
        for place, ok, w in zip(places, right, weights):
            out[(place, bool(ok))].append(w)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dir", help="a LengthEval output folder (samples.jsonl)")
    p.add_argument("--task", default="s_niah")
    args = p.parse_args(argv)
    path = Path(args.eval_dir) / "samples.jsonl"
    rows = [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r["task"] == args.task]
    rows = [r for r in rows if "source_chunk_weight" in r]
    if not rows:
        sys.exit(f"error: no {args.task} row of {path} records source_chunk_weight (evaluations before session 12 "
                 f"do not)")
    print(f"Fusion weight of the source chunk, {args.task} answer tokens of {args.eval_dir} ({len(rows)} samples; "
          f"per token the largest weight any retrieval layer and head gave the chunk, 0 where none picked it)\n")
    print("| token | outcome | n | mean weight | under 0.5 | at least 0.9 |\n|---|---|---|---|---|---|")
    for (place, right), w in groups(rows).items():
        if w:
            n = len(w)
            print(f"| {place} | {'right' if right else 'wrong'} | {n} | {sum(w) / n:.3f} | "
                  f"{100 * sum(x < 0.5 for x in w) / n:.0f}% | {100 * sum(x >= 0.9 for x in w) / n:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
