"""MoE layer benchmark: routed experts + shared expert versus a dense SwiGLU with the same active width.

    python -m benchmarks.moe --out docs/bench/moe.json

Prints a markdown table and writes JSON. bf16, one GPU. For each shape (tokens N, d_model, experts E,
active k, expert width h) it times forward and forward+backward of the MoE layer (router, top-k,
grouped experts through ``torch._grouped_mm``, shared expert) and of the same layer through the padded
batched-matmul fallback, against a dense SwiGLU of width (k + shared) * h, the same active parameters.
Useful FLOPs (expert matmuls only): forward 6 * N * d * h * (k + shared), forward+backward 3x that.
"""
from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch

from benchmarks.kernels import bench
from hsa_lightning.kernels.moe import parallel
from hsa_lightning.model.ffn import SwiGLUMLP
from hsa_lightning.plugins.ffn.moe import MoE

REP_MS = 50  # do_bench repetition time per measurement
SHAPES = [  # (tokens, d_model, experts, active, expert hidden)
    (32768, 512, 16, 2, 704),     # configs/moe_demo_gpu.yaml
    (32768, 2048, 64, 4, 1024),   # configs/moe_8b_a1b.yaml
    (16384, 2048, 64, 4, 1024),
]


def fwd_bwd(layer, x):
    def run():
        out = layer(x)
        out.backward(torch.ones_like(out))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/bench/moe.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = []
    for N, d, E, k, h in SHAPES:
        torch.manual_seed(0)
        moe = MoE(experts=E, active=k, expert_hidden=h, shared_experts=1).build(d, 1, 0.02, 0.01)
        moe = moe.to(device, torch.bfloat16).train()
        dense = SwiGLUMLP(d, (k + 1) * h, 0.02, 0.01).to(device, torch.bfloat16)
        x = torch.randn(N, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        flops = 6 * N * d * h * (k + 1)
        row = {"tokens": N, "d_model": d, "experts": E, "active": k, "expert_hidden": h}
        with torch.no_grad():
            row["moe_fwd_ms"] = bench(lambda: moe(x), rep=REP_MS)
            row["dense_fwd_ms"] = bench(lambda: dense(x), rep=REP_MS)
        row["moe_fwdbwd_ms"] = bench(fwd_bwd(moe, x), rep=REP_MS)
        row["dense_fwdbwd_ms"] = bench(fwd_bwd(dense, x), rep=REP_MS)
        supported = parallel._grouped_mm_supported
        parallel._grouped_mm_supported = lambda a: False
        row["moe_padded_fwdbwd_ms"] = bench(fwd_bwd(moe, x), rep=REP_MS)
        parallel._grouped_mm_supported = supported
        for key in ("moe_fwdbwd_ms", "dense_fwdbwd_ms"):
            if isinstance(row[key], float):
                row[key.replace("_ms", "_tflops")] = 3 * flops / row[key] / 1e9
        if isinstance(row["moe_fwdbwd_ms"], float) and isinstance(row["dense_fwdbwd_ms"], float):
            row["moe_over_dense"] = row["moe_fwdbwd_ms"] / row["dense_fwdbwd_ms"]
        rows.append(row)
        print(row, flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "date": str(date.today()), "dtype": "bfloat16", "command": "python -m benchmarks.moe"}
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r.get(k):.3g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys) + " |")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
