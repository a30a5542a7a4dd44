"""Kernel benchmark: Triton HSA vs cuDNN full causal attention, on one GPU.

    python benchmarks/kernels.py --out docs/kernels.json [--lengths 4096,8192,...] [--quick]

Prints a markdown table and writes JSON. Shapes: batch 1, 16 query heads, chunk 64, bf16. For each
(L, top-k, head dim, G = query heads per HSA KV head, selection pattern) it times HSA forward, HSA
forward+backward, the fused retrieval (scores + mask + top-k + softmax weights) forward+backward and
the reference retrieval it replaces,
the HSA layer's attention (SWA 512 via FlexAttention + HSA) forward+backward, and cuDNN full causal
attention forward+backward (``--cuda_graphs``: these three as CUDA-graph replays, without the host's
launch work, which bounds short sequences). Useful FLOPs: forward 4*L*Hq*k*64*D, forward+backward 3.5x
that. ``--kernels tokens,chunks`` times the token-centric and the chunk-centric HSA kernels side by side
(by default ``hsa_attention`` picks by group size); ``joint`` times the joint-softmax fusion ablation's
kernels (``kernels/hsa/joint.py``) on the same picks.

Selection patterns: ``smooth`` (each 64-token query chunk draws k visible chunks, each token swaps about
10% of them for random visible ones; the printed share is the fraction of a token's chunks its
predecessor also read) and ``random`` (independent uniform picks among the visible chunks).
``union_per_k`` is the mean number of distinct chunks a kernel tile visits divided by k: the work the
union tiling does per useful chunk.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from datetime import date

import torch
import torch.nn.functional as F

HQ, S = 16, 64


def visible_topk_random(L: int, k: int, hkv: int, gen: torch.Generator, device) -> torch.Tensor:
    """(1, L, hkv, k) uniform distinct visible chunks (most recent first), padding index 0."""
    C = L // S
    out = torch.empty(1, L, hkv, k, dtype=torch.long, device=device)
    for h in range(hkv):
        for t0 in range(0, L, 8192):
            t = torch.arange(t0, min(L, t0 + 8192), device=device)
            r = torch.rand(len(t), C, generator=gen, device=device)
            r = r.masked_fill(torch.arange(C, device=device)[None] >= (t // S)[:, None], -1.0)
            out[0, t, h] = r.topk(min(k, C), -1).indices[:, :k]
    return out


def smooth_selection(L: int, k: int, hkv: int, gen: torch.Generator, device, swap: float = 0.1) -> torch.Tensor:
    C = L // S
    base = visible_topk_random(C * S, k, hkv, gen, device)[:, ::S]  # one set per query chunk
    idx = base.repeat_interleave(S, dim=1)[:, :L].clone()
    n_vis = (torch.arange(L, device=device) // S).clamp_min(1)[None, :, None, None]
    rand = (torch.rand(idx.shape, generator=gen, device=device) * n_vis).long()
    swap_mask = torch.rand(idx.shape, generator=gen, device=device) < swap
    return torch.where(swap_mask, rand, idx)


def finish_selection(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark slots beyond the visible count as padding (index 0, weight 0), sort most recent first."""
    L, k = idx.shape[1], idx.shape[-1]
    n_vis = (torch.arange(L, device=idx.device) // S)[None, :, None, None]
    valid = torch.arange(k, device=idx.device) < n_vis
    idx = torch.where(valid, idx, -1).sort(-1, descending=True).values
    valid = idx >= 0
    w = torch.rand(idx.shape, generator=gen, device=idx.device) * valid
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-9)
    return idx.clamp_min(0), w.float()


def union_per_k(idx: torch.Tensor, block_tokens: int) -> float:
    """Distinct chunks a tile of ``block_tokens`` tokens visits, per useful chunk (k), on average."""
    from hsa_lightning.kernels.hsa.parallel import block_union

    return round(block_union(idx, block_tokens)[1].float().mean().item() / idx.shape[-1], 2)


def shared_fraction(idx: torch.Tensor, sample: int = 4096) -> float:
    L = idx.shape[1]
    t = torch.randint(S * 2, L, (min(sample, L - 2 * S),), device=idx.device)
    a, b = idx[0, t, 0], idx[0, t - 1, 0]
    return (a[:, :, None] == b[:, None, :]).any(-1).float().mean().item()


def captured(fn):
    """``fn`` captured in a CUDA graph after warm-up (autotuning, compilation): (a function that replays it,
    the captured call's outputs, which each replay rewrites). A replay is the GPU time without the host's
    launch work, what ``torch.compile(mode="reduce-overhead")`` gives."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def bench(fn, rep: int = 40, graphs: bool = False) -> float | str:
    """Median-ish milliseconds from triton's do_bench (``rep`` ms of repetitions) of ``fn`` or, with
    ``graphs``, of its CUDA-graph replay; or "OOM"."""
    from triton.testing import do_bench

    try:
        return do_bench(captured(fn)[0] if graphs else fn, warmup=10, rep=rep)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def run_case(L, k, D, G, pattern, args, device, kernels="auto"):
    from hsa_lightning.kernels.hsa.parallel import block_union, hsa_attention as hsa, tile_shape, uses_chunk_kernels
    from hsa_lightning.kernels.retrieval import fusion_weights, retrieval_scores, select_chunks, weights_from_selected
    from hsa_lightning.kernels.retrieval.parallel import select_chunks_fused
    from hsa_lightning.plugins.attention.hsa_triton import HSATriton

    hkv = HQ // G
    gen = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(1, L, HQ, D, device=device, dtype=dt, requires_grad=True)
    kk = torch.randn(1, L, hkv, D, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(1, L, hkv, D, device=device, dtype=dt, requires_grad=True)
    raw = smooth_selection(L, k, hkv, gen, device) if pattern == "smooth" else visible_topk_random(L, k, hkv, gen, device)
    idx, w = finish_selection(raw, gen)
    w.requires_grad_()
    do = torch.randn_like(q)
    if kernels == "joint":  # the joint-softmax fusion ablation: the same picks, no weights (no dw)
        from hsa_lightning.kernels.hsa.joint import joint_chunk_attention

        def hsa_attention(q, kk, v, w, idx, S):
            return joint_chunk_attention(q, kk, v, w > 0, idx, S)

        grad_inputs = (q, kk, v)
    else:
        by_chunk = {"auto": uses_chunk_kernels(q, L, G, k), "tokens": False, "chunks": True}[kernels]

        def hsa_attention(*a):
            return hsa(*a, by_chunk=by_chunk)

        grad_inputs = (q, kk, v, w)
        kernels = "chunks" if by_chunk else "tokens"

    row = {"L": L, "top_k": k, "head_dim": D, "G": G, "pattern": pattern, "shared": round(shared_fraction(idx), 3),
           "kernels": kernels}
    row["union_per_k"] = union_per_k(idx, tile_shape(G)[0])
    row["hsa_fwd_ms"] = bench(lambda: hsa_attention(q, kk, v, w, idx, S))

    def fwd_bwd():
        o = hsa_attention(q, kk, v, w, idx, S)
        torch.autograd.grad(o, grad_inputs, do)

    row["hsa_fwd_bwd_ms"] = bench(fwd_bwd, graphs=args.cuda_graphs)
    flops = 4 * L * HQ * k * S * D
    if isinstance(row["hsa_fwd_bwd_ms"], float):
        row["hsa_fwd_tflops"] = flops / row["hsa_fwd_ms"] / 1e9
        row["hsa_fwd_bwd_tflops"] = 3.5 * flops / row["hsa_fwd_bwd_ms"] / 1e9
    if not args.skip_retrieval:
        q_slc = torch.randn(1, L, hkv, D, device=device, dtype=dt, requires_grad=True)
        lmk = torch.randn(1, L // S, hkv, D, device=device, dtype=dt, requires_grad=True)

        def fused():
            i, ok, sel = select_chunks_fused(q_slc, lmk, k, S)
            torch.autograd.grad(weights_from_selected(sel, ok).square().sum(), (q_slc, lmk))

        row["retrieval_fwd_bwd_ms"] = bench(fused)
        if L <= args.max_retrieval_len:

            def reference():
                s = retrieval_scores(q_slc, lmk, S)
                i, ok = select_chunks(s, k)
                torch.autograd.grad(fusion_weights(s, i, ok).square().sum(), (q_slc, lmk))

            row["retrieval_ref_fwd_bwd_ms"] = bench(reference)
    if L <= args.max_dense_len:
        backend = HSATriton()
        qs = torch.randn(1, L, HQ, D, device=device, dtype=dt, requires_grad=True)
        ks, vs = (torch.randn(1, L, 4, D, device=device, dtype=dt, requires_grad=True) for _ in range(2))

        def layer():
            o1 = backend.local_attention(qs, ks, vs, 512)
            o2 = hsa_attention(q, kk, v, w, idx, S)
            torch.autograd.grad((o1, o2), (qs, ks, vs, q, kk, v), (do, do))

        row["hsa_layer_fwd_bwd_ms"] = bench(layer, graphs=args.cuda_graphs)
        qd, kd, vd = (torch.randn(1, HQ, L, D, device=device, dtype=dt, requires_grad=True) for _ in range(3))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def dense():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            torch.autograd.grad(o, (qd, kd, vd), torch.ones_like(o))

        row["cudnn_causal_fwd_bwd_ms"] = bench(dense, graphs=args.cuda_graphs)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--top_k", default="16,32")
    p.add_argument("--head_dims", default="64,128")
    p.add_argument("--groups", default="1,4,16")
    p.add_argument("--patterns", default="smooth,random")
    p.add_argument("--max_dense_len", type=int, default=131072, help="longest L for the dense / layer columns")
    p.add_argument("--max_retrieval_len", type=int, default=131072, help="longest L for the reference retrieval")
    p.add_argument("--skip_retrieval", action="store_true")
    p.add_argument("--kernels", default="auto",
                   help="HSA kernels to time: auto (hsa_attention's choice), or a list of tokens / chunks / joint "
                        "(the joint-softmax fusion ablation's kernels)")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="time the forward+backward columns (HSA, HSA layer, cuDNN) as CUDA-graph replays")
    p.add_argument("--out", default="docs/kernels.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    device = torch.device("cuda")
    import triton

    torch._dynamo.config.recompile_limit = 256  # FlexAttention compiles once per shape in this sweep

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": str(date.today()), "batch": 1, "query_heads": HQ,
            "chunk": S, "dtype": "bfloat16", "cuda_graphs": args.cuda_graphs, "command": " ".join(sys.argv)}
    rows = []
    cols = ["L", "top_k", "head_dim", "G", "pattern", "kernels", "shared", "union_per_k", "hsa_fwd_ms", "hsa_fwd_bwd_ms", "hsa_fwd_bwd_tflops",
            "retrieval_fwd_bwd_ms", "retrieval_ref_fwd_bwd_ms", "hsa_layer_fwd_bwd_ms", "cudnn_causal_fwd_bwd_ms"]
    print(f"# {meta}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for pattern in args.patterns.split(","):
        for G in ints(args.groups):
            for D in ints(args.head_dims):
                for k in ints(args.top_k):
                    for L in ints(args.lengths):
                        for kernels in args.kernels.split(","):
                            row = run_case(L, k, D, G, pattern, args, device, kernels)
                            torch.cuda.empty_cache()
                            rows.append(row)
                            with open(args.out, "w") as f:  # after every row, so a cut-off run keeps its table
                                json.dump({"meta": meta, "rows": rows}, f, indent=1)
                            cells = [row.get(c, "") for c in cols]
                            print("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells)
                                  + " |", flush=True)


if __name__ == "__main__":
    main()
