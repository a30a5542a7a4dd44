"""Fused Triton retrieval against the reference scores + visibility + top-k, through the interpreter."""
import pytest
import torch

from hsa_lightning.kernels.retrieval import retrieval_scores, select_chunks, weights_from_selected
from hsa_lightning.kernels.retrieval.parallel import select_chunks_fused

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run; the GPU file covers CUDA")


@pytest.mark.parametrize("B,T,H,DR,S,K", [
    (1, 150, 2, 16, 8, 4),   # many blocks of landmarks, T not a multiple of S
    (2, 70, 1, 32, 16, 8),   # top-k above the visible count everywhere
    (1, 200, 1, 16, 4, 20),  # k > 16: wider running top-N
    (1, 9, 1, 16, 16, 2),    # nothing visible at all
])
def test_fused_selection_equals_reference_with_gradients(B, T, H, DR, S, K):
    g = torch.Generator().manual_seed(T)
    C = -(-T // S)
    q = torch.randn(B, T, H, DR, generator=g, requires_grad=True)
    lmk = torch.randn(B, C, H, DR, generator=g, requires_grad=True)
    idx, valid, sel = select_chunks_fused(q, lmk, K, S)
    scores = retrieval_scores(q, lmk, S)
    ref_idx, ref_valid = select_chunks(scores, K)
    assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)
    ref_sel = torch.gather(scores, -1, ref_idx)
    torch.testing.assert_close(sel[valid], ref_sel[valid], rtol=1e-5, atol=1e-5)
    # Gradients through the fusion weights, the only path the model uses.
    cot = torch.randn(idx.shape, generator=g)
    w = weights_from_selected(sel, valid)
    w_ref = weights_from_selected(ref_sel, ref_valid)
    got = torch.autograd.grad((w * cot).sum(), (q, lmk), allow_unused=True)
    want = torch.autograd.grad((w_ref * cot).sum(), (q, lmk), allow_unused=True)
    for a, b in zip(got, want):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wide", [False, True])
def test_hsa_triton_select_routes_wide_selections_to_the_reference(wide, monkeypatch):
    """A curriculum's top_k='all' gives top-k x width beyond the fused kernel's tile: HSATriton then
    selects through the reference, with the same result either way."""
    from hsa_lightning.model.attention_backend import AttentionBackend
    from hsa_lightning.plugins.attention import hsa_triton

    calls = []
    monkeypatch.setattr(hsa_triton, "MAX_FUSED_TOPK_X_WIDTH", 16 * 6 - 1 if wide else 16 * 6)
    original = AttentionBackend.select
    monkeypatch.setattr(AttentionBackend, "select", lambda *a, **k: calls.append(1) or original(*a, **k))
    g = torch.Generator().manual_seed(0)
    q, lmk = torch.randn(1, 100, 1, 16, generator=g), torch.randn(1, 13, 1, 16, generator=g)
    idx, valid, sel = hsa_triton.HSATriton().select(q, lmk, 6, 8, False)
    ref_idx, ref_valid, ref_sel = original(AttentionBackend(), q, lmk, 6, 8, False)
    assert bool(calls) == wide
    assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)
    torch.testing.assert_close(sel[valid], ref_sel[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query_start,T", [(37, 70), (300, 64)])
def test_fused_selection_with_query_start_equals_reference(query_start, T):
    """Inference reads a segment (rows at positions query_start..) against every earlier chunk."""
    g = torch.Generator().manual_seed(query_start)
    S, K = 16, 5
    C = (query_start + T) // S + 1
    q = torch.randn(1, T, 2, 16, generator=g)
    lmk = torch.randn(1, C, 2, 16, generator=g)
    idx, valid, sel = select_chunks_fused(q, lmk, K, S, query_start)
    scores = retrieval_scores(q, lmk, S, query_start=query_start)
    ref_idx, ref_valid = select_chunks(scores, K)
    assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)
    torch.testing.assert_close(sel[valid], torch.gather(scores, -1, ref_idx)[valid], rtol=1e-5, atol=1e-5)
