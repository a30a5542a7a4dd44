"""Markdown tables from benchmark JSON files (benchmarks/kernels.py output).

    python benchmarks/report.py docs/bench/*.json
"""
import json
import sys

COLS = [("L", "L"), ("top_k", "k"), ("head_dim", "D"), ("G", "G"), ("pattern", "pattern"), ("kernels", "kernels"),
        ("shared", "shared"),
        ("union_per_k", "union/k"), ("hsa_fwd_ms", "HSA fwd ms"), ("hsa_fwd_bwd_ms", "HSA fwd+bwd ms"),
        ("hsa_fwd_bwd_tflops", "useful TFLOP/s"), ("retrieval_fwd_bwd_ms", "fused retrieval fwd+bwd ms"),
        ("retrieval_ref_fwd_bwd_ms", "reference retrieval ms"), ("hsa_layer_fwd_bwd_ms", "HSA layer (SWA 512 + HSA) ms"),
        ("cudnn_causal_fwd_bwd_ms", "cuDNN causal fwd+bwd ms")]


def fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))


def main(paths):
    for path in paths:
        data = json.load(open(path))
        print(f"\n**{path}** ({data['meta']['device']}, torch {data['meta']['torch']}, triton {data['meta']['triton']}, "
              f"{data['meta']['date']}; `{data['meta']['command']}`)\n")
        print("| " + " | ".join(name for _, name in COLS) + " |")
        print("|" + "---|" * len(COLS))
        for row in sorted(data["rows"], key=lambda r: (r["pattern"], r["G"], r["head_dim"], r["top_k"], r["L"])):
            print("| " + " | ".join(fmt(row.get(key)) for key, _ in COLS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
