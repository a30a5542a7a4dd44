"""The vectorised retrieval + HSA reference against a naive per-token loop, in float64."""
import math

import pytest
import torch

from hsa_lightning.kernels.hsa import hsa_attention_reference, joint_chunk_attention_reference
from hsa_lightning.kernels.retrieval import fusion_weights, retrieval_scores, select_chunks, with_successors


def naive_hsa(q_slc, lmk, q, k, v, S, top_k, fusion, recency=None, successors=False):
    """Token by token, head by head, exactly as DESIGN section 4 words it. ``successors`` (config
    ``read_successor``): a chosen chunk c whose successor is visible too shares its weight with c + 1.
    ``softmax_and_union``: the mean of what ``softmax`` and ``joint_scored`` give."""
    if fusion == "softmax_and_union":
        return (naive_hsa(q_slc, lmk, q, k, v, S, top_k, "softmax", recency, successors)
                + naive_hsa(q_slc, lmk, q, k, v, S, top_k, "joint_scored", recency, successors)) / 2
    B, T, H, D = q.shape
    Hkv, Dr = k.shape[2], q_slc.shape[-1]
    G = H // Hkv
    rows = []
    for b in range(B):
        for t in range(T):
            for h in range(Hkv):
                n_vis = t // S  # chunk i visible iff (i + 1) * S <= t
                if n_vis == 0:
                    rows.append(torch.zeros(G, D, dtype=q.dtype))
                    continue
                scores = torch.stack([q_slc[b, t, h] @ lmk[b, i, h] / math.sqrt(Dr) for i in range(n_vis)])
                chosen = torch.topk(scores, min(top_k, n_vis)).indices.sort(descending=True).values
                s = scores[chosen]
                if recency is not None:
                    s = s + torch.arange(len(chosen), dtype=s.dtype) * recency
                if fusion in ("softmax", "joint_scored"):
                    w = torch.softmax(s, 0)
                elif fusion == "stick_breaking":
                    sig = torch.sigmoid(s)
                    w = torch.stack([sig[j] * torch.prod(1 - sig[:j]) for j in range(len(s))])
                else:  # joint: every chosen chunk alike
                    w = torch.ones_like(s)
                # (chunk, fusion weight, shift of its keys' logits in the joint fusions)
                listed = []
                for j, c in enumerate(chosen.tolist()):
                    shift = s[j] if fusion == "joint_scored" else s.new_zeros(())  # its (recency-biased) score
                    if successors and c + 1 < n_vis:
                        listed += [(c, w[j] / 2, shift + math.log(0.5)), (c + 1, w[j] / 2, shift + math.log(0.5))]
                    else:
                        listed.append((c, w[j], shift))
                outs = []
                for g in range(G):
                    qh = q[b, t, h * G + g]
                    if fusion in ("joint", "joint_scored"):  # one softmax over the listed chunks' keys
                        keys = torch.cat([k[b, c * S:(c + 1) * S, h] for c, _, _ in listed])
                        vals = torch.cat([v[b, c * S:(c + 1) * S, h] for c, _, _ in listed])
                        logits = keys @ qh / math.sqrt(D) + torch.stack([x for _, _, x in listed]).repeat_interleave(S)
                        outs.append(torch.softmax(logits, 0) @ vals)
                        continue
                    o = torch.zeros(D, dtype=q.dtype)
                    for c, wc, _ in listed:
                        p = torch.softmax(k[b, c * S:(c + 1) * S, h] @ qh / math.sqrt(D), 0)
                        o = o + wc * (p @ v[b, c * S:(c + 1) * S, h])
                    outs.append(o)
                rows.append(torch.stack(outs))
    return torch.stack(rows).view(B, T, Hkv, G, D).reshape(B, T, H, D)


def vectorised_hsa(q_slc, lmk, q, k, v, S, top_k, fusion, recency=None):
    scores = retrieval_scores(q_slc, lmk, S)
    idx, valid = select_chunks(scores, top_k)
    w = fusion_weights(scores, idx, valid, fusion, recency)
    if fusion in ("joint", "joint_scored"):
        return joint_chunk_attention_reference(q, k, v, w, idx, S)
    if fusion == "softmax_and_union":
        return (hsa_attention_reference(q, k, v, w, idx, S) + joint_chunk_attention_reference(q, k, v, w, idx, S)) / 2
    return hsa_attention_reference(q, k, v, w, idx, S)


def make_inputs(B, T, H, Hkv, D, Dr, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = -(-T // S)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return r(B, T, Hkv, Dr), r(B, C, Hkv, Dr), r(B, T, H, D), r(B, C * S, Hkv, D), r(B, C * S, Hkv, D)


CASES = [
    # (B, T, H, Hkv, S, top_k): group sizes 1..16, T not a multiple of S, top_k above the visible count
    (2, 37, 4, 4, 8, 2),
    (1, 40, 4, 2, 8, 3),
    (2, 29, 8, 2, 4, 16),
    (1, 33, 16, 1, 8, 2),
    (1, 12, 2, 1, 8, 4),  # one visible chunk at most
]


@pytest.mark.parametrize("fusion", ["softmax", "stick_breaking", "joint", "joint_scored", "softmax_and_union"])
@pytest.mark.parametrize("B,T,H,Hkv,S,top_k", CASES)
def test_reference_matches_naive_loop_outputs_and_gradients(B, T, H, Hkv, S, top_k, fusion):
    inputs = make_inputs(B, T, H, Hkv, 6, 5, S)
    names = ["q_slc", "landmarks", "q", "k", "v"]
    out_ref = vectorised_hsa(*inputs, S, top_k, fusion)
    out_naive = naive_hsa(*inputs, S, top_k, fusion)
    torch.testing.assert_close(out_ref, out_naive, rtol=1e-10, atol=1e-10)
    cot = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad((out_ref * cot).sum(), inputs, allow_unused=True)
    grads_naive = torch.autograd.grad((out_naive * cot).sum(), inputs, allow_unused=True)
    for name, a, b in zip(names, grads_ref, grads_naive):
        if fusion == "joint" and name in ("q_slc", "landmarks"):
            assert a is None and b is None  # the union softmax ignores the scores: no retrieval gradient
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")


@pytest.mark.parametrize("fusion", ["softmax", "stick_breaking", "joint_scored", "softmax_and_union"])
def test_retrieval_query_and_landmarks_get_nonzero_gradient_through_weights(fusion):
    q_slc, lmk, q, k, v = make_inputs(1, 40, 4, 1, 6, 5, 8)
    out = vectorised_hsa(q_slc, lmk, q, k, v, 8, 2, fusion)
    g_slc, g_lmk = torch.autograd.grad(out.square().sum(), (q_slc, lmk))
    assert g_slc.abs().sum() > 0 and g_lmk.abs().sum() > 0
    # Tokens of the first chunk see nothing, so their retrieval query gets no gradient at all.
    assert g_slc[:, :8].abs().sum() == 0


def test_recency_bias_matches_naive_loop():
    inputs = make_inputs(1, 36, 4, 2, 6, 5, 4)
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    out_ref = vectorised_hsa(*inputs, 4, 3, "softmax", theta)
    out_naive = naive_hsa(*inputs, 4, 3, "softmax", theta)
    torch.testing.assert_close(out_ref, out_naive, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(out_ref.sum(), theta)
    assert g.abs() > 0


def test_selection_rule_visibility_padding_and_recency_order():
    S, T, C = 4, 14, 4
    scores = retrieval_scores(torch.randn(1, T, 1, 3, dtype=torch.float64), torch.randn(1, C, 1, 3, dtype=torch.float64), S)
    idx, valid = select_chunks(scores, 3)
    for t in range(T):
        n_vis = t // S
        assert valid[0, t, 0].tolist() == [j < n_vis for j in range(3)]
        real = idx[0, t, 0, :min(3, n_vis)]
        assert all((c + 1) * S <= t for c in real.tolist())  # only complete past chunks
        assert real.tolist() == sorted(real.tolist(), reverse=True)  # most recent first
        assert (idx[0, t, 0, min(3, n_vis):] == 0).all()  # padding slots hold a valid index
    w = fusion_weights(scores, idx, valid)
    assert (w[~valid] == 0).all() and (w[0, :S].sum() == 0)
    torch.testing.assert_close(w[0, S:].sum(-1), torch.ones(T - S, 1, dtype=w.dtype))


def test_selection_noise_changes_choice_but_weights_use_clean_scores():
    S, T = 4, 40
    scores = retrieval_scores(torch.randn(1, T, 1, 3, dtype=torch.float64), torch.randn(1, 10, 1, 3, dtype=torch.float64), S)
    noise = -torch.log(torch.empty_like(scores).exponential_()) * 10
    idx_clean, _ = select_chunks(scores, 2)
    idx_noisy, valid = select_chunks(scores, 2, noise)
    assert not torch.equal(idx_clean, idx_noisy)
    w = fusion_weights(scores, idx_noisy, valid)
    chosen = torch.gather(scores, -1, idx_noisy)
    expected = torch.softmax(chosen.masked_fill(~valid, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(w, expected)


def test_many_queries_selecting_one_chunk():
    """Every token picks chunk 0: the reference equals dense attention over chunk 0 for t >= S."""
    B, T, H, Hkv, D, S = 1, 32, 4, 2, 6, 8
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    k, v = torch.randn(B, T, Hkv, D, dtype=torch.float64), torch.randn(B, T, Hkv, D, dtype=torch.float64)
    idx = torch.zeros(B, T, Hkv, 1, dtype=torch.long)
    w = torch.ones(B, T, Hkv, 1, dtype=torch.float64)
    out = hsa_attention_reference(q, k, v, w, idx, S)
    kk = k[:, :S].repeat_interleave(H // Hkv, dim=2)
    vv = v[:, :S].repeat_interleave(H // Hkv, dim=2)
    p = torch.softmax(torch.einsum("bthd,bshd->bths", q, kk) / math.sqrt(D), -1)
    torch.testing.assert_close(out, torch.einsum("bths,bshd->bthd", p, vv))


@pytest.mark.parametrize("fusion", ["softmax", "stick_breaking", "joint", "joint_scored"])
@pytest.mark.parametrize("B,T,H,Hkv,S,top_k", CASES)
def test_successor_expansion_matches_naive_loop_outputs_and_gradients(B, T, H, Hkv, S, top_k, fusion):
    inputs = make_inputs(B, T, H, Hkv, 6, 5, S, seed=3)
    q_slc, lmk, q, k, v = inputs
    scores = retrieval_scores(q_slc, lmk, S)
    idx, valid = select_chunks(scores, top_k)
    idx, w = with_successors(idx, fusion_weights(scores, idx, valid, fusion), S)
    attend = joint_chunk_attention_reference if fusion.startswith("joint") else hsa_attention_reference
    out = attend(q, k, v, w.double(), idx, S)  # joint's mask weights are float32: log(0.5) exactly
    expected = naive_hsa(*inputs, S, top_k, fusion, successors=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    wanted = inputs[2:] if fusion == "joint" else inputs  # joint: no retrieval gradient
    cot = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * cot).sum(), wanted), torch.autograd.grad((expected * cot).sum(), wanted)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w.sum(-1), fusion_weights(scores, *select_chunks(scores, top_k), fusion).sum(-1))
