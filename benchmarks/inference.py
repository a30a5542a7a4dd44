"""Inference benchmark: prefill, suffix-only scoring and decode of the small GPU model, 64K to 16M tokens.

    python -m benchmarks.inference --out docs/bench/inference.json [--lengths 65536,...] [--config ...]

Random weights and random tokens (speed does not depend on what the model learned; selections of an
untrained model are less local than a trained one's, which only makes the retrieval and offload columns
pessimistic). bf16, batch 1, one GPU. Per context length L:
  prefill       ``engine.prefill(ids, last=1)``: everything a generation needs (lower decoder + encoder over
                all L tokens, upper decoder over the suffix its exact state needs); tokens/s and peak memory
  all layers    ``engine.token_nll(ids)``: every layer over every token plus the LM head (perplexity)
  suffix score  ``engine.token_nll(ids, last=16)``: teacher-forced scoring of 16 answer tokens (S-NIAH)
  decode        ms per token over 64 greedy steps after the prefill (and with the chunk K/V offloaded)
Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

from hsa_lightning.inference import InferenceEngine
from hsa_lightning.inference.cli import load_model

GiB = 2**30


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def decode_ms(engine: InferenceEngine, steps: int) -> float:
    token = torch.zeros(engine.batch_size, dtype=torch.long, device=engine.device)
    engine.step(token)  # first step after a prefill may compile
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = engine.step(token).argmax(-1)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small_gpu.yaml")
    ap.add_argument("--lengths", default="65536,262144,1048576,4194304,16777216")
    ap.add_argument("--all_layers_max", type=int, default=1 << 20, help="longest L for the all-layers pass")
    ap.add_argument("--decode_lengths", default="4096,65536,1048576")
    ap.add_argument("--decode_steps", type=int, default=64)
    ap.add_argument("--segment_len", type=int, default=16384)
    ap.add_argument("--out", default="docs/bench/inference.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    model = load_model(args.config, None, device, torch.bfloat16)
    n_params = model.num_parameters()
    lengths = [int(x) for x in args.lengths.split(",")]
    decode_lengths = {int(x) for x in args.decode_lengths.split(",")}
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = model.config.vocab_size

    # warm-up: compile the sliding-window kernels and autotune the Triton kernels at every shape used
    warm = InferenceEngine(model, max_tokens=4 * args.segment_len + 64, segment_len=args.segment_len, progress=False)
    ids = torch.randint(0, vocab, (1, 4 * args.segment_len), device=device, generator=gen)
    warm.prefill(ids, last=1), warm.reset(), warm.token_nll(ids), decode_ms(warm, 2)
    del warm

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "date": str(date.today()), "dtype": "bfloat16", "config": args.config, "parameters": n_params,
            "segment_len": args.segment_len, "batch": 1,
            "command": "python -m benchmarks.inference " + " ".join(f"--{k} {v}" for k, v in vars(args).items())}
    rows = []
    for L in sorted(set(lengths) | decode_lengths):
        ids = torch.randint(0, vocab, (1, L), device=device, generator=gen)
        engine = InferenceEngine(model, max_tokens=L + args.decode_steps + 1, segment_len=args.segment_len,
                                 progress=L >= 1 << 22)
        row = {"L": L, "cache_gib": sum(engine.cache_bytes().values()) / GiB}
        torch.cuda.reset_peak_memory_stats()
        row["prefill_s"], _ = timed(lambda: engine.prefill(ids, last=1))
        row["prefill_tok_s"] = L / row["prefill_s"]
        row["prefill_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        if L in decode_lengths:
            row["decode_ms"] = decode_ms(engine, args.decode_steps)
        engine.reset()
        row["suffix_score_s"], _ = timed(lambda: engine.token_nll(ids, last=16))
        if L <= args.all_layers_max:
            engine.reset()
            row["all_layers_s"], _ = timed(lambda: engine.token_nll(ids))
            row["all_layers_tok_s"] = L / row["all_layers_s"]
        del engine
        if L in decode_lengths:
            off = InferenceEngine(model, max_tokens=L + args.decode_steps + 1, segment_len=args.segment_len,
                                  offload=True, progress=False)
            row["offload_prefill_s"], _ = timed(lambda: off.prefill(ids, last=1))
            row["offload_decode_ms"] = decode_ms(off, args.decode_steps)
            del off
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:  # after every row, so a cut-off run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
