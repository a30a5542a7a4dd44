"""Joint softmax over the union of the selected chunks (the NSA/MoBA-style fusion ablation) in Triton.

Semantics are exactly ``naive.joint_chunk_attention_reference``: one softmax per (token, query head) over
the keys of every selected chunk, each slot's logits shifted by the log of its weight (0 marks padding; a
chunk in two slots counts with both weights, as there), output 0 for a token without a real slot. Fusion
``joint`` passes the slot mask (no shift, no gradient to retrieval); ``joint_scored`` the fusion weights.

The work is laid out as ``parallel.py``'s token-centric kernels: a block of BT tokens x the G query heads
of one KV head visits the union of its tokens' chunks, a row weighting each chunk by the weights of the
slots its token picked it in. Across chunks the softmax runs online (FlashAttention's rescaling), and the
forward saves one log-sum-exp per row. The backward recomputes P from it: dQ and dw in the same
token-block visit, dK/dV in one program per chunk (or work item) over the entries that picked it, whose
partials ``parallel``'s reduce kernel adds in item order: no atomics, bit-identical gradients.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hsa_lightning.kernels.hsa.parallel import (_block_picks, _block_queries, _check, _chunk_kv, _entry_rows,
                                                _hsa_bwd_dkdv_reduce_kernel, _pow2, _rows_from_tokens, _store_dkdv,
                                                _tuned, _work_item, block_union, chunk_csr, common_dtype, dkdv_work,
                                                inner_contiguous, tile_shape)


@_tuned("G", "D", "S", "KSEL", "BT")
@triton.jit
def _joint_fwd_kernel(
    Q, Kmem, V, W, IDX, UNION, COUNT, O, LSE,
    sqb, sqt, sqh, skb, skt, skh, swb, swt, swh, sub, suh, sun, scb, sch, slb, slt, slh,
    T, HKV, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BT: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    KSEL: tl.constexpr, K_PAD: tl.constexpr,
):
    """O = softmax over the union's keys, each chunk's exponentials times its weight (summed over the slots
    that picked it) @ V; LSE in the log2 domain (+inf for a row without a real slot: the backward's P is 0)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    d = tl.arange(0, D)
    tok, row_ok, head, row_off, q = _block_queries(Q, sqb, sqt, sqh, pid_t, b, h, T, BT, G, G_PAD, D)
    idx, w, _sel_off, _sel_ok = _block_picks(IDX, W, b, h, pid_t, swb, swt, swh, T, BT, KSEL, K_PAD)
    m = tl.full((BT * G_PAD,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BT * G_PAD,), dtype=tl.float32)
    acc = tl.zeros((BT * G_PAD, D), dtype=tl.float32)
    u_base = UNION + b.to(tl.int64) * sub + h * suh + pid_t.to(tl.int64) * sun
    n = tl.load(COUNT + b * scb + h * sch + pid_t)
    s_idx = tl.arange(0, S)
    for u in range(0, n):
        c = tl.load(u_base + u).to(tl.int64)
        row_w = _rows_from_tokens(tl.sum(tl.where(idx == c, w, 0.0), axis=1), BT, G_PAD)
        kv_off = b.to(tl.int64) * skb + (c * S + s_idx).to(tl.int64) * skt + h * skh
        kt = tl.load(Kmem + kv_off[None, :] + d[:, None])  # (D, S)
        v = tl.load(V + kv_off[:, None] + d[None, :])  # (S, D)
        s = tl.dot(q, kt) * (scale * 1.4426950408889634)
        s = tl.where(row_w[:, None] > 0, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep everything at 0
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None]) * row_w[:, None]
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    seen = l > 0
    o = acc / tl.where(seen, l, 1.0)[:, None]
    tl.store(O + row_off, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float("inf"))
    tl.store(LSE + b.to(tl.int64) * slb + tok.to(tl.int64) * slt + head * slh, lse, mask=row_ok)


@_tuned("G", "D", "S", "KSEL", "BT")
@triton.jit
def _joint_bwd_dq_kernel(
    Q, Kmem, V, W, IDX, UNION, COUNT, DO, LSE, DELTA, DQ, DW,
    sqb, sqt, sqh, skb, skt, skh, swb, swt, swh, sub, suh, sun, scb, sch, slb, slt, slh,
    T, HKV, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BT: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    KSEL: tl.constexpr, K_PAD: tl.constexpr,
):
    """dQ = sum over the union of P * (dP - delta) @ K * scale, P recomputed from the saved LSE; dw of a slot
    = that sum over its chunk's keys without the weight, over the group's heads (0 for a padding slot)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    d = tl.arange(0, D)
    tok, row_ok, head, row_off, q = _block_queries(Q, sqb, sqt, sqh, pid_t, b, h, T, BT, G, G_PAD, D)
    do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
    stat_off = b.to(tl.int64) * slb + tok.to(tl.int64) * slt + head * slh
    lse = tl.load(LSE + stat_off, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stat_off, mask=row_ok, other=0.0)
    idx, w, sel_off, sel_ok = _block_picks(IDX, W, b, h, pid_t, swb, swt, swh, T, BT, KSEL, K_PAD)
    dq = tl.zeros((BT * G_PAD, D), dtype=tl.float32)
    dw = tl.zeros((BT, K_PAD), dtype=tl.float32)
    u_base = UNION + b.to(tl.int64) * sub + h * suh + pid_t.to(tl.int64) * sun
    n = tl.load(COUNT + b * scb + h * sch + pid_t)
    s_idx = tl.arange(0, S)
    for u in range(0, n):
        c = tl.load(u_base + u).to(tl.int64)
        picked = (idx == c) & (w > 0)
        row_w = _rows_from_tokens(tl.sum(tl.where(picked, w, 0.0), axis=1), BT, G_PAD)
        kv_off = b.to(tl.int64) * skb + (c * S + s_idx).to(tl.int64) * skt + h * skh
        kt = tl.load(Kmem + kv_off[None, :] + d[:, None])  # (D, S)
        vt = tl.load(V + kv_off[None, :] + d[:, None])  # (D, S)
        s = tl.dot(q, kt) * (scale * 1.4426950408889634)
        # P / w; 0 where the row's token did not pick the chunk (those logits may pass the row's LSE)
        p_unit = tl.exp2(tl.where(row_w[:, None] > 0, s, float("-inf")) - lse[:, None])
        ds_unit = p_unit * (tl.dot(do, vt) - delta[:, None])
        dq += tl.dot((ds_unit * row_w[:, None]).to(kt.dtype), tl.trans(kt))
        dw_tok = tl.sum(tl.reshape(tl.sum(ds_unit, axis=1), (BT, G_PAD)), axis=1)  # summed over the heads
        dw += tl.where(picked, dw_tok[:, None], 0.0)
    tl.store(DQ + row_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DW + sel_off, dw, mask=sel_ok)


@_tuned("G", "D", "S", "BR")
@triton.jit
def _joint_bwd_dkdv_kernel(
    Q, Kmem, V, W, ENTRIES, TABLE, DO, LSE, DELTA, DK, DV, PART_DK, PART_DV,
    sqb, sqt, sqh, skb, skt, skh, swb, swt, swh, seb, seh, stb, sth, spb, sph, sps, slb, slt, slh,
    T, HKV, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BR: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    KSEL: tl.constexpr,
):
    """dK, dV of one work item's chunk (or a partial of them) over its valid (token, slot) entries."""
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    c, start, end, slot = _work_item(TABLE, stb, sth, tl.program_id(0), b, h)
    if c >= 0:
        kv_off, k, v = _chunk_kv(Kmem, V, b, h, c, skb, skt, skh, S, D)
        dk = tl.zeros((S, D), dtype=tl.float32)
        dv = tl.zeros((S, D), dtype=tl.float32)
        e_base = ENTRIES + b.to(tl.int64) * seb + h * seh
        for e0 in range(start, end, BR):
            _tok, _sel, w, _ok, tok_row, row_ok, head, row_off, q = _entry_rows(
                Q, e_base, W, e0, end, b, h, swb, swt, swh, sqb, sqt, sqh, BR, KSEL, G, G_PAD, D)
            do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
            stat_off = b.to(tl.int64) * slb + tok_row * slt + head * slh
            lse = tl.load(LSE + stat_off, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + stat_off, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * (scale * 1.4426950408889634)
            p = tl.exp2(s - lse[:, None]) * _rows_from_tokens(w, BR, G_PAD)[:, None]  # (M, S)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        _store_dkdv(dk, dv, slot, DK, DV, PART_DK, PART_DV, kv_off, b, h, spb, sph, sps, scale, S, D)


def _prepare(q, k, v, weights, indices, chunk_size):
    _check(q, k, v, weights, indices, chunk_size)
    # the memory may be a strided prefix of an inference cache: never copy it
    return (q.contiguous(), inner_contiguous(k), inner_contiguous(v), weights.float().contiguous(),
            indices.to(torch.int32).contiguous())


def joint_forward(q, k, v, weights, indices, chunk_size: int, scale: float):
    """(output, lse (B, T, H) fp32 in the log2 domain, union, count)."""
    q, k, v, weights, indices = _prepare(q, k, v, weights, indices, chunk_size)
    B, T, H, D = q.shape
    Hkv, K = k.shape[2], indices.shape[-1]
    bt, g_pad = tile_shape(H // Hkv)
    union, count = block_union(indices, bt)
    o = torch.empty_like(q)
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    _joint_fwd_kernel[(triton.cdiv(T, bt), B * Hkv)](
        q, k, v, weights, indices, union, count, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        weights.stride(0), weights.stride(1), weights.stride(2),
        union.stride(0), union.stride(1), union.stride(2), count.stride(0), count.stride(1),
        lse.stride(0), lse.stride(1), lse.stride(2),
        T, Hkv, scale,
        G=H // Hkv, G_PAD=g_pad, BT=bt, S=chunk_size, D=D, KSEL=K, K_PAD=_pow2(K),
    )
    return o, lse, union, count


def joint_backward(do, q, k, v, weights, indices, o, lse, union, count, chunk_size: int, scale: float):
    """(dq, dk, dv, dw) from the forward's output, LSE and token-block union."""
    q, k, v, weights, indices = _prepare(q, k, v, weights, indices, chunk_size)
    do = do.contiguous()
    B, T, H, D = q.shape
    Hkv, K = k.shape[2], indices.shape[-1]
    G = H // Hkv
    bt, g_pad = tile_shape(G)
    delta = (o.float() * do.float()).sum(-1)  # (B, T, H): rowsum(P * dP) = <o, dO>
    dq, dw = torch.empty_like(q), torch.empty_like(weights)
    _joint_bwd_dq_kernel[(triton.cdiv(T, bt), B * Hkv)](
        q, k, v, weights, indices, union, count, do, lse, delta, dq, dw,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        weights.stride(0), weights.stride(1), weights.stride(2),
        union.stride(0), union.stride(1), union.stride(2), count.stride(0), count.stride(1),
        lse.stride(0), lse.stride(1), lse.stride(2),
        T, Hkv, scale,
        G=G, G_PAD=g_pad, BT=bt, S=chunk_size, D=D, KSEL=K, K_PAD=_pow2(K),
    )
    entries, offsets = chunk_csr(indices, weights, k.shape[1] // chunk_size)  # valid weights only
    table, n_items, first_slot, _, n_slots = dkdv_work(offsets, T * K, bt)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    part_dk = torch.empty(B, Hkv, n_slots, chunk_size, D, device=k.device, dtype=torch.float32)
    part_dv = torch.empty_like(part_dk)
    _joint_bwd_dkdv_kernel[(table.shape[2], B * Hkv)](
        q, k, v, weights, entries, table, do, lse, delta, dk, dv, part_dk, part_dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        weights.stride(0), weights.stride(1), weights.stride(2),
        entries.stride(0), entries.stride(1), table.stride(0), table.stride(1),
        part_dk.stride(0), part_dk.stride(1), part_dk.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        T, Hkv, scale,
        G=G, G_PAD=_pow2(G), BR=bt, S=chunk_size, D=D, KSEL=K,
    )
    _hsa_bwd_dkdv_reduce_kernel[(k.shape[1] // chunk_size, B * Hkv)](
        n_items, first_slot, part_dk, part_dv, dk, dv,
        n_items.stride(0), n_items.stride(1), part_dk.stride(0), part_dk.stride(1), part_dk.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        Hkv, scale, S=chunk_size, D=D,
    )
    return dq, dk, dv, dw


# -- autograd: custom ops with fake implementations, so torch.compile treats them as opaque ----------
@torch.library.custom_op("hsa_lightning::joint_chunk_attention", mutates_args=())
def _joint_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
              chunk_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return joint_forward(q, k, v, weights, indices, chunk_size, scale)


@_joint_op.register_fake
def _(q, k, v, weights, indices, chunk_size, scale):
    B, T, H, _ = q.shape
    Hkv, K = k.shape[2], indices.shape[-1]
    bt, _ = tile_shape(H // Hkv)
    nb = -(-T // bt)
    return (torch.empty_like(q), q.new_empty((B, T, H), dtype=torch.float32),
            q.new_empty((B, Hkv, nb, bt * K), dtype=torch.int32), q.new_empty((B, Hkv, nb), dtype=torch.int32))


@torch.library.custom_op("hsa_lightning::joint_chunk_attention_backward", mutates_args=())
def _joint_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                       indices: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, union: torch.Tensor,
                       count: torch.Tensor, chunk_size: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return joint_backward(do, q, k, v, weights, indices, o, lse, union, count, chunk_size, scale)


@_joint_backward_op.register_fake
def _(do, q, k, v, weights, indices, o, lse, union, count, chunk_size, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(weights, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, weights, indices, chunk_size, scale = inputs
    o, lse, union, count = output
    ctx.save_for_backward(q, k, v, weights, indices, o, lse, union, count)
    ctx.mark_non_differentiable(lse, union, count)
    ctx.chunk_size, ctx.scale = chunk_size, scale


def _backward(ctx, do, _lse, _union, _count):
    q, k, v, weights, indices, o, lse, union, count = ctx.saved_tensors
    dq, dk, dv, dw = _joint_backward_op(do, q, k, v, weights, indices, o, lse, union, count, ctx.chunk_size,
                                        ctx.scale)
    return dq, dk, dv, dw.to(weights.dtype), None, None, None


_joint_op.register_autograd(_backward, setup_context=_setup_context)


def joint_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                          indices: torch.Tensor, chunk_size: int, scale: float | None = None) -> torch.Tensor:
    """Triton joint softmax: same contract as ``joint_chunk_attention_reference`` (q (B,T,H,D); k, v
    (B,Lm,Hkv,D); weights >= 0, 0 marking padding, and indices (B,T,Hkv,K)); differentiable in q, k, v and
    the weights."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = common_dtype(q, k, v)
    return _joint_op(q, k, v, weights, indices, chunk_size, scale)[0]
