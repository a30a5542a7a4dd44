"""How fast does a layout learn to copy from far back? A CPU-sized learnability check (not a test).

Each sequence is ``s, gap, s, tail``: ``s`` is 96 random tokens (``--copy-len``), the gap random tokens
of a length drawn per step (``--gap-max 0``: no gap, so the copy sits at a fixed offset). Only the second
``s`` is scored, so its loss starts at ln(vocab) and falls only once the model copies across more than the
SWA window: through full attention, or through the chunk memory of HSA blocks. With a fixed offset a RoPE head can
copy by position alone; with random gaps it takes an induction circuit (match the previous token, read
the next).

    python benchmarks/copy_task.py --layout "SS|HH" --attention Flash --steps 400
    python benchmarks/copy_task.py --layout SSFS --gap-max 0 -o copy_ssfs.json
    python benchmarks/copy_task.py --layout "SS|HH" --attention Flash --set landmark=mean --seed 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch
import yaml

from hsa_lightning.eval.source_chunks import SourceChunkWatch
from hsa_lightning.model.config import ModelConfig
from hsa_lightning.model.hsalm import HSALM
from hsa_lightning.registry import build_plugin, load_plugins


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="SS|HH", help="a Pattern string: S (SWA), F (full), H (HSA), | (encoder)")
    p.add_argument("--attention", default="HSAReference")
    p.add_argument("--top-k", default="4", help="an int or 'all'")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--gap-max", type=int, default=64, help="gaps are drawn from [0, gap-max); 0: fixed offset")
    p.add_argument("--copy-len", type=int, default=96, help="tokens in s (the copy distance with --gap-max 0)")
    p.add_argument("--position-in-hsa", action="store_true")
    p.add_argument("--hsa-kv-heads", type=int, default=1, help="K/V heads of the chunk memory (of 4 query heads)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field (YAML value), e.g. --set hsa_residual=standard; repeatable")
    p.add_argument("--eval-batches", type=int, default=16, help="batches of the accuracy split after training")
    p.add_argument("--eval-top-k", default="", help="comma-separated top-k values to measure the trained model's "
                   "accuracy split at as well (fewer picks: less weight on the chunks that do not hold the copy)")
    p.add_argument("-o", "--output", help="write the loss curve and the accuracy split here as JSON")
    args = p.parse_args()
    eval_top_k = [x.strip() for x in args.eval_top_k.split(",") if x.strip()]
    if not all(x.isdigit() and int(x) > 0 for x in eval_top_k):
        raise SystemExit(f"--eval-top-k {args.eval_top_k!r}: expected positive integers separated by commas, e.g. 2,1")

    load_plugins()
    vocab, n, batch, tail = 64, args.copy_len, 16, max(args.gap_max, 1)
    torch.manual_seed(args.seed)
    fields = dict(vocab_size=vocab, d_model=64, n_layers=sum(c in "SFH" for c in args.layout), n_heads=4,
                  n_kv_heads=2, hsa_kv_heads=args.hsa_kv_heads, chunk_size=8, top_k=4, window=16,
                  position_in_hsa=args.position_in_hsa)
    cfg = ModelConfig(**{**fields, **dict(_override(item) for item in args.set)})  # --set wins over the defaults
    layout = {"class_path": "Pattern", "init_args": {"pattern": args.layout}}
    model = HSALM(cfg, build_plugin("attention", args.attention), build_plugin("layout", layout),
                  build_plugin("position", "RoPE"), build_plugin("ffn", "SwiGLU"))
    model.set_top_k(args.top_k if args.top_k == "all" else int(args.top_k))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gaps = f"gaps < {args.gap_max}" if args.gap_max else "fixed offset"
    print(f"layout {args.layout}, {args.attention}, top-k {args.top_k}, {gaps}; "
          f"chance = ln {vocab} = {math.log(vocab):.3f}")
    print("| step | copy loss | seconds |\n|---|---|---|")

    def sample():
        s = torch.randint(0, vocab, (batch, n))
        gap = int(torch.randint(0, args.gap_max, ())) if args.gap_max else 0
        return torch.cat([s, torch.randint(0, vocab, (batch, gap)), s, torch.randint(0, vocab, (batch, tail - gap))], 1), gap

    curve, start = [], time.time()
    for step in range(1, args.steps + 1):
        x, gap = sample()
        labels = x[:, 1:].clone()
        labels[:, : n + gap] = -100  # score only the tokens of the second copy
        labels[:, 2 * n + gap:] = -100
        total, count = model.loss(x[:, :-1], labels)
        loss = total / count
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            curve.append({"step": step, "copy_loss": round(loss.item(), 4)})
            print(f"| {step} | {loss.item():.3f} | {time.time() - start:.0f} |", flush=True)
    split = copy_accuracy(model, sample, n, cfg.chunk_size, args.eval_batches)
    _print_split("copy accuracy after training", split)
    at_top_k = {}
    for k in map(int, eval_top_k):
        model.set_top_k(k)
        at_top_k[k] = copy_accuracy(model, sample, n, cfg.chunk_size, args.eval_batches)
        _print_split(f"copy accuracy of the trained model at top-k {k}", at_top_k[k])
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "chance": math.log(vocab), "curve": curve, "accuracy": split,
                       "accuracy_at_top_k": at_top_k}, f, indent=1)


def _print_split(title: str, split: dict) -> None:
    print(f"{title}, % (n): " + ", ".join(f"{k} {v['pct']} ({v['n']})" for k, v in split.items()))
    for k, v in split.items():
        if "retrieved_pct" in v:
            print(f"  {k}: the source chunk retrieved {v['retrieved_pct']}%; right {v['pct_when_retrieved']}% when "
                  f"retrieved, {v['pct_when_missed']}% when not; its fusion weight where retrieved "
                  f"{v['weight_when_right']} on right tokens, {v['weight_when_wrong']} on wrong ones")


@torch.no_grad()
def copy_accuracy(model, sample, n: int, chunk_size: int, batches: int) -> dict:
    """Greedy accuracy on the second copy's tokens 1..n-1, split by where the token copied sits in the first
    copy: inside the chunk of the matched token before it, or at the start of the next chunk (the copy then
    has to read a chunk the match did not point to). With HSA blocks, also how often some block's retrieval
    picked the chunk holding the token to copy, and the accuracy when it did and when it did not: a miss
    there is retrieval's, a miss on a retrieved chunk is the attention's; and, where retrieved, the mean fusion
    weight of that chunk for right and wrong tokens (a wrong token whose chunk weighs little was outweighed by
    the other picks)."""
    model.eval()
    right = {"inside a chunk": [], "starts a chunk": []}
    found = {"inside a chunk": [], "starts a chunk": []}
    weight = {"inside a chunk": [], "starts a chunk": []}
    source_chunks = (torch.arange(1, n) // chunk_size).tolist()  # token j of the first copy sits at position j
    starts = torch.arange(1, n) % chunk_size == 0
    retrieves = False  # whether any retrieval layer ran (the Flash backend reads every chunk without one)
    for _ in range(batches):
        x, gap = sample()
        queries = range(n + gap, 2 * n + gap - 1)  # the positions predicting second-copy tokens 1..n-1
        with SourceChunkWatch(model, list(queries), source_chunks, batch=x.shape[0]) as watch:
            ok = model(x)[:, queries.start:queries.stop].argmax(-1) == x[:, 1:n]
        retrieves |= watch.seen
        hit = watch.hits
        for split, where in (("starts a chunk", starts), ("inside a chunk", ~starts)):
            right[split].append(ok[:, where].flatten())
            found[split].append(hit[:, where].flatten())
            weight[split].append(watch.weights[:, where].flatten())
    model.train()
    out = {}
    for split in right:
        ok, hit, w = torch.cat(right[split]), torch.cat(found[split]), torch.cat(weight[split])
        pct = lambda t: round(100 * t.float().mean().item(), 1) if t.numel() else None  # noqa: E731
        mean = lambda t: round(t.mean().item(), 3) if t.numel() else None  # noqa: E731
        out[split] = {"pct": pct(ok), "n": ok.numel()}
        if retrieves:
            out[split].update(retrieved_pct=pct(hit), pct_when_retrieved=pct(ok[hit]), pct_when_missed=pct(ok[~hit]),
                              weight_when_right=mean(w[ok & hit]), weight_when_wrong=mean(w[~ok & hit]))
    return out


def _override(item: str) -> tuple[str, object]:
    field, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: expected FIELD=VALUE, e.g. hsa_residual=standard")
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    if field not in names:
        raise SystemExit(f"--set {item!r}: ModelConfig has no field {field!r}; it has {', '.join(names)}")
    return field, yaml.safe_load(value)


if __name__ == "__main__":
    main()
