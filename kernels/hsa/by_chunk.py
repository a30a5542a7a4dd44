"""HSA attention for small query groups, chunk-centric: forward and backward are one program per chunk.

With few query heads per HSA KV head, the token-centric kernels of ``parallel.py`` fill a 64-row MMA
tile with many tokens, whose selections differ: the tile visits the union of their chunks (2-3x k at
G = 1) and most of each K/V tile's rows are masked out. Here a program owns one chunk (or one slice of
the tokens that picked it, for popular chunks, from the work table ``dkdv_work`` builds): it loads the
chunk's K and V once and runs them against tiles of 64-128 (token, slot) rows that all picked it, read
from the inverse index ``chunk_csr`` builds (every slot, zero weights included, since their dw counts).
No row is wasted; the price is one partial output per (token, slot), written once and summed over the
slots by a second pass in slot order (deterministic, no atomics).

The backward is the token-centric path's dK/dV pass (``parallel.dkdv_pass``) asked for dQ as well: per
entry it also writes the entry's dQ partial and its dw; split chunks' dK/dV partials and the dQ
partials are then summed. Same semantics as ``naive.hsa_attention_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hsa_lightning.kernels.hsa.parallel import (_chunk_kv, _chunk_softmax, _entry_rows, _pow2, _rows_from_tokens,
                                                _tuned, _work_item, chunk_csr, dkdv_pass, dkdv_work)

# (entry, head) rows per MMA tile, measured on the H200 at 32K (docs/benchmarks.md, session 10): the
# forward gains from 128 rows only with one head per entry (G = 1: 6.1 against 6.5 ms; G = 4 loses 6%),
# the backward with any group (G = 1: 0.7 ms, G = 4: 0.7 ms less)
FWD_ROWS, FWD_ROWS_ONE_HEAD, BWD_ROWS = 64, 128, 128
SUM_TILE = 2048  # elements each program of the slot sum accumulates (tokens x heads x head dim)


def entry_rows(group: int, rows: int) -> tuple[int, int]:
    """(entries per block BR, padded group G_PAD): BR * G_PAD = ``rows``, or G_PAD rows for larger groups."""
    g_pad = _pow2(group)
    return max(1, rows // g_pad), g_pad


@_tuned("G", "D", "S", "KSEL", "BR")
@triton.jit
def _fwd_by_chunk_kernel(
    Q, Kmem, V, W, ENTRIES, TABLE, OP,
    sqb, sqt, sqh, skb, skt, skh, swb, swt, swh, seb, seh, stb, sth, spb, spt, sps, sph,
    T, HKV, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BR: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    KSEL: tl.constexpr,
):
    """OP[b, token, slot, head] = w * softmax(q K_c^T) V_c for every entry (token, slot) of chunk c."""
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    c, start, end, _slot = _work_item(TABLE, stb, sth, tl.program_id(0), b, h)
    if c >= 0:
        _kv_off, k, v = _chunk_kv(Kmem, V, b, h, c, skb, skt, skh, S, D)
        kt = tl.trans(k)  # (D, S)
        e_base = ENTRIES + b.to(tl.int64) * seb + h * seh
        for e0 in range(start, end, BR):
            _tok, sel, w, _ok, tok_row, row_ok, head, _row_off, q = _entry_rows(
                Q, e_base, W, e0, end, b, h, swb, swt, swh, sqb, sqt, sqh, BR, KSEL, G, G_PAD, D)
            p = _chunk_softmax(q, kt, scale)
            o = tl.dot(p.to(v.dtype), v) * _rows_from_tokens(w, BR, G_PAD)[:, None]
            sel_row = _rows_from_tokens(sel, BR, G_PAD).to(tl.int64)
            o_off = b.to(tl.int64) * spb + tok_row[:, None] * spt + sel_row[:, None] * sps + head[:, None] * sph
            tl.store(OP + o_off + tl.arange(0, D)[None, :], o.to(OP.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sum_slots_kernel(P, O, spb, spt, sps, sph, sob, sot, soh, T, H,
                      KSEL: tl.constexpr, BT: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr):
    """O[b, t, head] = sum over slots of P[b, t, slot, head], in slot order. A program owns BT tokens with
    all their heads, so each slot's load is BT runs of H * D contiguous elements (coalesced)."""
    b = tl.program_id(1)
    r = tl.arange(0, BT * H_PAD)
    t = (tl.program_id(0) * BT + r // H_PAD).to(tl.int64)
    hq = r % H_PAD
    ok = ((t < T) & (hq < H))[:, None]
    d = tl.arange(0, D)[None, :]
    base = P + b.to(tl.int64) * spb + t[:, None] * spt + hq[:, None] * sph + d
    acc = tl.zeros((BT * H_PAD, D), dtype=tl.float32)
    for j in range(0, KSEL):
        acc += tl.load(base + j * sps, mask=ok, other=0.0).to(tl.float32)
    tl.store(O + b.to(tl.int64) * sob + t[:, None] * sot + hq[:, None] * soh + d, acc.to(O.dtype.element_ty), mask=ok)


def _sum_slots(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    B, T, K, H, D = partial.shape
    h_pad = _pow2(H)
    bt = max(1, SUM_TILE // (h_pad * D))
    _sum_slots_kernel[(triton.cdiv(T, bt), B)](
        partial, out, partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        out.stride(0), out.stride(1), out.stride(2), T, H, KSEL=K, BT=bt, H_PAD=h_pad, D=D,
    )
    return out


def forward_by_chunk(q, k, v, weights, indices, chunk_size: int, scale: float):
    """(output, entries, offsets): the inverse index is returned for the backward. Inputs as
    ``parallel.hsa_forward`` prepares them (q contiguous, k/v inner-contiguous, fp32 weights, int32 ids)."""
    B, T, H, D = q.shape
    Hkv, K = k.shape[2], indices.shape[-1]
    G = H // Hkv
    br, g_pad = entry_rows(G, FWD_ROWS_ONE_HEAD if G == 1 else FWD_ROWS)
    entries, offsets = chunk_csr(indices, None, k.shape[1] // chunk_size)
    table = dkdv_work(offsets, T * K, br)[0]
    partial = torch.empty(B, T, K, H, D, device=q.device, dtype=q.dtype)
    _fwd_by_chunk_kernel[(table.shape[2], B * Hkv)](
        q, k, v, weights, entries, table, partial,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        weights.stride(0), weights.stride(1), weights.stride(2),
        entries.stride(0), entries.stride(1), table.stride(0), table.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        T, Hkv, scale,
        G=G, G_PAD=g_pad, BR=br, S=chunk_size, D=D, KSEL=K,
    )
    return _sum_slots(partial, torch.empty_like(q)), entries, offsets


def backward_by_chunk(do, q, k, v, weights, indices, entries, offsets, chunk_size: int, scale: float):
    """(dq, dk, dv, dw) from the forward's inverse index: one dK/dV pass that also writes the dQ shares."""
    B, T, H, D = q.shape
    dq_partial = torch.empty(B, T, indices.shape[-1], H, D, device=q.device, dtype=q.dtype)
    dw = torch.empty_like(weights)
    br, _ = entry_rows(H // k.shape[2], BWD_ROWS)
    dk, dv = dkdv_pass(do, q, k, v, weights, entries, offsets, chunk_size, scale, br, dq_partial, dw)
    return _sum_slots(dq_partial, torch.empty_like(q)), dk, dv, dw
