"""Sliding-window attention through FlexAttention: forward and forward+backward milliseconds of the band
(the block mask ``HSATriton`` builds) for FlexAttention's default kernel tiles and a grid of
backward ``kernel_options``, at one training shape. ``plugins/attention/hsa_triton.py::FLEX_BACKWARD_TILES`` holds
the winners per head dim; this script is how they were chosen (docs/benchmarks.md, issue 7).

    python -m benchmarks.flex_window --out docs/bench/flex_window.json [--batch 2 --heads 12 --head_dim 64
        --length 16384 --window 512 --budget_s 300]

Each variant compiles once (a few seconds); variants left when ``budget_s`` runs out are skipped.
Prints a markdown table, writes JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from datetime import date

import torch


def variants() -> dict[str, dict | None]:
    out: dict[str, dict | None] = {"FlexAttention's default": None}
    for (m1, n1, m2, n2), (warps, stages) in itertools.product(
            ((32, 64, 64, 32), (64, 64, 64, 64), (32, 128, 128, 32), (64, 128, 128, 64)), ((4, 3), (8, 2))):
        out[f"M1 {m1} N1 {n1} M2 {m2} N2 {n2}, {warps} warps, {stages} stages"] = dict(  # the backward's alone
            bwd_BLOCK_M1=m1, bwd_BLOCK_N1=n1, bwd_BLOCK_M2=m2, bwd_BLOCK_N2=n2, bwd_num_warps=warps, bwd_num_stages=stages)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--budget_s", type=float, default=300.0)
    p.add_argument("--out", default="docs/bench/flex_window.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/flex_window.py needs a CUDA GPU")
    if args.length % 128:
        sys.exit(f"--length {args.length} must be a multiple of 128 (the block mask's tile, as in HSATriton)")
    import triton
    from torch.nn.attention.flex_attention import flex_attention

    from hsa_lightning.plugins.attention.hsa_triton import sliding_window_block_mask

    shape = (args.batch, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    mask = sliding_window_block_mask(args.length, args.window, "cuda")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": str(date.today()), "dtype": "bfloat16",
            "command": "python -m benchmarks.flex_window " + " ".join(sys.argv[1:]), **vars(args)}
    rows, deadline = [], time.perf_counter() + args.budget_s
    for name, options in variants().items():
        if time.perf_counter() > deadline:
            print(f"budget spent: {name} and later variants skipped")
            break
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)

        def forward():
            return flex(q, k, v, block_mask=mask, kernel_options=options)

        def forward_backward():
            forward().backward(do)

        try:
            start = time.perf_counter()
            forward_backward()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            with torch.no_grad():
                fwd = triton.testing.do_bench(forward, warmup=10, rep=50)
            both = triton.testing.do_bench(forward_backward, warmup=10, rep=50, grad_to_none=[q, k, v])
            rows.append({"variant": name, "kernel_options": options, "fwd_ms": fwd, "fwd_bwd_ms": both,
                         "bwd_ms": both - fwd, "compile_s": compile_s})
        except Exception as error:  # a tile that does not fit this GPU's shared memory: recorded, not fatal
            rows.append({"variant": name, "kernel_options": options, "error": str(error)[:300]})
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as f:  # after every variant, so a cut-off run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))
    print("\n| kernel tiles | fwd ms | fwd+bwd ms | bwd ms |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][:60]} | | |")
        else:
            print(f"| {r['variant']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['bwd_ms']:.3f} |")


if __name__ == "__main__":
    main()
