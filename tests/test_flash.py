"""The Flash backend against naive float64 attention loops."""
import math

import pytest
import torch

from conftest import plugin
from hsa_lightning.model.attention_backend import AttentionBackend, ChunkMemory


def naive_memory_attention(q, k, v, S):
    """Token t attends to every memory key of a complete past chunk: j < S * floor(t / S)."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            n = (t // S) * S
            if n == 0:
                continue
            for h in range(H):
                p = torch.softmax(k[b, :n, h // G] @ q[b, t, h] / math.sqrt(D), 0)
                out[b, t, h] = p @ v[b, :n, h // G]
    return out


def naive_local_attention(q, k, v, window):
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            lo = 0 if window is None else max(0, t - window + 1)
            for h in range(H):
                p = torch.softmax(k[b, lo:t + 1, h // G] @ q[b, t, h] / math.sqrt(D), 0)
                out[b, t, h] = p @ v[b, lo:t + 1, h // G]
    return out


@pytest.mark.parametrize("T,S,H,Hkv", [(37, 8, 4, 1), (24, 8, 2, 2), (20, 4, 8, 2)])
def test_flash_memory_attention_matches_naive(T, S, H, Hkv):
    C = -(-T // S)
    q = torch.randn(2, T, H, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, C * S, Hkv, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, C * S, Hkv, 6, dtype=torch.float64, requires_grad=True)
    mem = ChunkMemory(k=k, v=v, landmarks=torch.zeros(2, C, Hkv, 4, dtype=torch.float64), chunk_size=S)
    out = plugin("attention", "Flash").memory_attention(q, mem, None)
    expected = naive_memory_attention(q, k, v, S)
    torch.testing.assert_close(out, expected)
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * cot).sum(), (q, k, v)),
                    torch.autograd.grad((expected * cot).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("backend", ["Flash", "HSAReference"])
@pytest.mark.parametrize("window", [None, 1, 5, 100])
def test_local_attention_matches_naive(backend, window):
    q = torch.randn(2, 23, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 23, 2, 8, dtype=torch.float64), torch.randn(2, 23, 2, 8, dtype=torch.float64)
    out = plugin("attention", backend).local_attention(q, k, v, window)
    torch.testing.assert_close(out, naive_local_attention(q, k, v, window))


def test_base_backend_local_attention_is_the_shared_default():
    assert plugin("attention", "HSAReference").local_attention.__func__ is AttentionBackend.local_attention


@pytest.mark.parametrize("T,window,block", [(100, 7, 16), (100, 40, 16), (64, 3, 64), (33, 50, 8)])
def test_banded_window_attention_matches_naive(T, window, block):
    """The compile-free sliding-window path (odd lengths on GPU, the CPU default), block by block."""
    from hsa_lightning.model.attention_backend import banded_window_attention

    g = torch.Generator().manual_seed(T + window)
    q = torch.randn(2, T, 4, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, T, 2, 8, generator=g, dtype=torch.float64), torch.randn(2, T, 2, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(banded_window_attention(q, k, v, window, block), naive_local_attention(q, k, v, window))
