"""How smooth are a model's chunk picks? For the first HSA block of an (untrained) model built from a config:
the share of a token's chunks its predecessor also picked, and ``union/k`` (distinct chunks an 8-token kernel
tile visits per useful chunk, the token-centric kernels' work), on random token ids (the training
benchmark's input) and on the first tokens of a shard folder; beside them the kernel benchmark's ``smooth``
and ``random`` patterns. CPU, the reference backend (docs/benchmarks.md, issue 7).

    python -m benchmarks.pick_smoothness --text data/demo/shards/heldout --out docs/bench/pick_smoothness.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import yaml

from benchmarks.kernels import finish_selection, shared_fraction, smooth_selection, union_per_k, visible_topk_random
from hsa_lightning.data.shards import stream_tokens
from hsa_lightning.data.tokenizer import load_tokenizer
from hsa_lightning.kernels.hsa.parallel import tile_shape
from hsa_lightning.model.retrieval import Retrieval
from hsa_lightning.params import module_from_spec


class _FirstPicks(Exception):
    """Raised by the hook once the first retrieval layer has picked: the rest of the model is not needed."""


def first_block_picks(model, ids: torch.Tensor) -> torch.Tensor:
    def stop(module, args, selection):
        raise _FirstPicks(selection.indices)

    layer = next(m for m in model.modules() if isinstance(m, Retrieval))
    hook = layer.register_forward_hook(stop)
    try:
        with torch.no_grad():
            model(ids[None])
    except _FirstPicks as picked:
        return picked.args[0]
    finally:
        hook.remove()
    raise RuntimeError("the model ran to its end without a retrieval layer picking chunks")


def smoothness(indices: torch.Tensor, group: int) -> dict:
    indices = indices.long()
    return {"shared": round(shared_fraction(indices), 3), "union_per_k": union_per_k(indices, tile_shape(group)[0])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small_gpu.yaml")
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--text", required=True, help="a prepared shard folder")
    p.add_argument("--tokenizer", default="data/demo/tokenizer.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/bench/pick_smoothness.json")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    with open(args.config) as f:
        spec = yaml.safe_load(f)["model"]
    spec["attention"] = "HSAReference"  # the same picks as HSATriton, on the CPU
    model = module_from_spec(spec).build_model().eval()
    cfg = model.config
    group = cfg.n_heads // cfg.hsa_kv_heads
    text = torch.from_numpy(stream_tokens(args.text, load_tokenizer(args.tokenizer)))[:args.length]
    if len(text) < args.length:
        sys.exit(f"--text holds {len(text):,} tokens, fewer than --length {args.length:,}")
    random_ids = torch.randint(0, cfg.vocab_size, (args.length,))
    rows = {"random ids": smoothness(first_block_picks(model, random_ids), group),
            "text": smoothness(first_block_picks(model, text), group)}
    gen = torch.Generator().manual_seed(args.seed)
    for name, pattern in (("kernel benchmark: smooth", smooth_selection),
                          ("kernel benchmark: random", visible_topk_random)):
        picks, _ = finish_selection(pattern(args.length, cfg.top_k, cfg.hsa_kv_heads, gen, "cpu"), gen)
        rows[name] = smoothness(picks, group)
    print(f"| picks ({args.config}, untrained, {args.length:,} tokens, G = {group}) | shared | union/k |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['shared']:.3f} | {r['union_per_k']:.2f} |")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
