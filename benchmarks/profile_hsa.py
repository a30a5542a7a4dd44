"""Per-kernel CUDA time of one HSA forward+backward (the profile behind docs/benchmarks.md).

    python benchmarks/profile_hsa.py --L 32768 --top_k 32 --head_dim 128 --G 16 [--pattern smooth]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.kernels import HQ, S, finish_selection, smooth_selection, visible_topk_random  # noqa: E402
from hsa_lightning.kernels.hsa.parallel import hsa_attention


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--L", type=int, default=32768)
    p.add_argument("--top_k", type=int, default=32)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--G", type=int, default=16)
    p.add_argument("--pattern", default="smooth")
    a = p.parse_args()
    dev, hkv = "cuda", HQ // a.G
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, a.L, HQ, a.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, a.L, hkv, a.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    pick = smooth_selection if a.pattern == "smooth" else visible_topk_random
    idx, w = finish_selection(pick(a.L, a.top_k, hkv, gen, dev), gen)
    w.requires_grad_()

    def step():
        torch.autograd.grad(hsa_attention(q, k, v, w, idx, S), (q, k, v, w), torch.ones_like(q))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))


if __name__ == "__main__":
    main()
