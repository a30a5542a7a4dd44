"""HSA attention in Triton: forward, query-centric dQ/dw, key-centric dK/dV. No atomics, no host sync.

Semantics are exactly ``naive.hsa_attention_reference``. Layout of the work:

* Tokens are processed in blocks of BT tokens x the G query heads of one KV head (BT * G_PAD >= 16 rows
  share every K/V tile, so any group size G works, including 1). A block iterates over the *union* of
  its tokens' selected chunks (built once with sorts, O(L*k)); a row whose token did not pick the chunk
  gets weight 0. Duplicate indices are therefore harmless: their weights add, as in the reference.
* Each chunk is one S-key tile: the softmax over it needs no online rescaling, and the backward
  recomputes it instead of saving statistics. Nothing but the output is saved.
* dQ and dw: one pass per token block (like the forward). dw of a slot = sum over the group's heads of
  <o_slot, dO>, computed in-tile as rowsum(P * dP).
* dK and dV: one program per (chunk, batch, KV head) over the compact list of (token, slot) pairs that
  picked the chunk (a CSR built by a stable sort), so every gradient is written once: deterministic.

Small query groups (padded G <= 4) take the chunk-centric kernels of ``by_chunk.py`` instead, where the
token blocks' unions would waste most of each K/V tile (``uses_chunk_kernels``).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

ROWS_PER_TILE = 64  # target rows (tokens x heads) sharing one K/V tile
MIN_ENTRIES_PER_ITEM = 256  # smallest dK/dV work item; larger when there is enough work to fill the GPU
BY_CHUNK_MAX_GROUP = 4  # padded group sizes up to this take the chunk-centric kernels of by_chunk.py
CHUNK_PARTIALS_MAX_BYTES = 8 << 30  # their per-slot outputs (and dQ shares) beyond this: query slices


def _tuned(*key: str):
    """Autotune launch shape on the GPU (keyed by the shape constants); plain kernels under the interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return lambda fn: fn
    configs = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (1, 2, 3)]
    return triton.autotune(configs=configs, key=list(key))


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tile_shape(group: int) -> tuple[int, int]:
    """(tokens per block BT, padded group G_PAD), both powers of two, BT * G_PAD >= 16 rows.

    Rows = tokens x heads share each K/V tile; more tokens per block give fuller MMAs but a larger union
    of chunks to visit (tokens do not pick identical sets). Measured on H100: 64 rows for G >= 8,
    16-32 rows for small groups, where the union grows fastest.
    """
    g_pad = _pow2(group)
    rows = max(16, min(ROWS_PER_TILE, 8 * g_pad))
    return max(1, rows // g_pad), g_pad


def block_union(indices: torch.Tensor, block_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, KV head, token block): the distinct chunks its tokens selected, most recent first.

    indices (B, T, Hkv, K) -> union (B, Hkv, NB, BT*K) int32 padded with -1, count (B, Hkv, NB) int32.
    """
    B, T, Hkv, K = indices.shape
    nb = -(-T // block_tokens)
    x = indices.permute(0, 2, 1, 3).to(torch.int32)
    x = torch.nn.functional.pad(x, (0, 0, 0, nb * block_tokens - T), value=-1)
    x = x.reshape(B, Hkv, nb, block_tokens * K).sort(dim=-1, descending=True).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = x.masked_fill(dup, -1).sort(dim=-1, descending=True).values  # distinct chunks first
    return x.contiguous(), (x >= 0).sum(-1, dtype=torch.int32).contiguous()


def chunk_csr(indices: torch.Tensor, weights: torch.Tensor | None, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the selection: for each (batch, KV head, chunk) the (token * K + slot) entries that
    picked it, only those with a non-zero weight when ``weights`` are given (zero-weight slots add nothing
    to dK/dV), every slot otherwise.

    Returns entries (B, Hkv, T*K) int32 sorted by chunk and offsets (B, Hkv, n_chunks + 1) int32.
    """
    B, T, Hkv, K = indices.shape
    key = indices if weights is None else torch.where(weights != 0, indices, n_chunks)
    key = key.permute(0, 2, 1, 3).reshape(B * Hkv, T * K).to(torch.int32)
    # One flat sort with each (batch, head) row's keys shifted into their own range: a third faster
    # than the per-row sort (H200, 32K tokens x 32 slots x 16 heads: 0.99 against 1.48 ms).
    rows = torch.arange(B * Hkv, device=key.device, dtype=torch.int32)[:, None]
    flat, order = torch.sort((key + rows * (n_chunks + 1)).reshape(-1), stable=True)
    row_start = rows.long() * (T * K)  # each row's first position in the flat order
    bounds = (rows * (n_chunks + 1) + torch.arange(n_chunks + 1, device=key.device, dtype=torch.int32)).reshape(-1)
    offsets = torch.searchsorted(flat, bounds).view(B * Hkv, n_chunks + 1) - row_start
    order = order.view(B * Hkv, T * K) - row_start
    return order.to(torch.int32).view(B, Hkv, T * K), offsets.to(torch.int32).view(B, Hkv, n_chunks + 1)


def dkdv_work(offsets: torch.Tensor, n_entries: int, block_tokens: int):
    """Cut each chunk's CSR list into work items of at most E entries (every chunk gets one item).

    Returns (table (B, Hkv, ITEMS, 4) int32 rows [chunk or -1, start, end, partial slot or -1],
    n_items (B, Hkv, C) int32, first_slot (B, Hkv, C) int32, E, n_slots). Shapes depend only on sizes,
    never on the data, so nothing waits for the GPU.
    """
    B, Hkv, C1 = offsets.shape
    C = C1 - 1
    sms = torch.cuda.get_device_properties(offsets.device).multi_processor_count if offsets.is_cuda else 8
    e = max(MIN_ENTRIES_PER_ITEM, -(-B * Hkv * n_entries // (4 * sms)))
    e = -(-e // block_tokens) * block_tokens
    n_split = -(-n_entries // e)
    items, n_slots = C + n_split, 2 * n_split + 1
    off = offsets.long()
    counts = off[..., 1:] - off[..., :-1]
    n_items = ((counts + e - 1) // e).clamp_min(1)
    item_end = n_items.cumsum(-1)
    i = torch.arange(items, device=offsets.device).expand(B, Hkv, items).contiguous()
    chunk = torch.searchsorted(item_end, i, right=True)
    valid = chunk < C
    chunk = chunk.clamp_max(C - 1)
    part = i - (item_end - n_items).gather(-1, chunk)
    start = off[..., :-1].gather(-1, chunk) + part * e
    end = torch.minimum(start + e, off[..., 1:].gather(-1, chunk))
    split = valid & (n_items.gather(-1, chunk) > 1)
    slot = torch.where(split, split.long().cumsum(-1) - 1, -1)
    table = torch.stack([torch.where(valid, chunk, -1), start, end, slot], dim=-1).to(torch.int32).contiguous()
    first_slot = torch.full_like(n_items, -1).scatter_reduce(
        -1, chunk, torch.where(split, slot, n_slots), reduce="amin", include_self=False
    )
    first_slot = torch.where(n_items > 1, first_slot, -1)
    return table, n_items.to(torch.int32).contiguous(), first_slot.to(torch.int32).contiguous(), e, n_slots


@triton.jit
def _token_rows(tok0, T, BT: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr):
    """Row r of a tile is (token tok0 + r // G_PAD, head r % G_PAD); valid when both are in range."""
    r = tl.arange(0, BT * G_PAD)
    tok = tok0 + r // G_PAD
    g = r % G_PAD
    return tok, g, (tok < T) & (g < G)


@triton.jit
def _rows_from_tokens(x, BT: tl.constexpr, G_PAD: tl.constexpr):
    """(BT,) per-token values -> (BT * G_PAD,) per-row values."""
    return tl.reshape(tl.broadcast_to(x[:, None], (BT, G_PAD)), (BT * G_PAD,))


@triton.jit
def _chunk_softmax(q, kt, scale):
    s = tl.dot(q, kt) * (scale * 1.4426950408889634)  # (M, S) fp32, log2 domain
    m = tl.max(s, axis=1)
    p = tl.exp2(s - m[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _block_queries(Q, sqb, sqt, sqh, pid_t, b, h, T, BT: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                   D: tl.constexpr):
    """A token block's rows (token, query head of KV head h): tokens, in range, heads, offsets, queries."""
    tok, g, row_ok = _token_rows(pid_t * BT, T, BT, G, G_PAD)
    head = (h * G + g).to(tl.int64)
    row_off = b.to(tl.int64) * sqb + tok.to(tl.int64)[:, None] * sqt + head[:, None] * sqh + tl.arange(0, D)[None, :]
    return tok, row_ok, head, row_off, tl.load(Q + row_off, mask=row_ok[:, None], other=0.0)


@triton.jit
def _block_picks(IDX, W, b, h, pid_t, swb, swt, swh, T, BT: tl.constexpr, KSEL: tl.constexpr,
                 K_PAD: tl.constexpr):
    """The block's selections, one row per token (K_PAD >= KSEL slots): chunk ids, weights, offsets, in range."""
    btok = pid_t * BT + tl.arange(0, BT)
    kk = tl.arange(0, K_PAD)
    sel_off = b.to(tl.int64) * swb + btok.to(tl.int64)[:, None] * swt + h * swh + kk[None, :]
    sel_ok = (btok < T)[:, None] & (kk < KSEL)[None, :]
    return tl.load(IDX + sel_off, mask=sel_ok, other=-1), tl.load(W + sel_off, mask=sel_ok, other=0.0), sel_off, sel_ok


@triton.jit
def _work_item(TABLE, stb, sth, item, b, h):
    """Row ``item`` of a work table (``dkdv_work``): chunk (-1: none), entry range, partial slot."""
    row = TABLE + b.to(tl.int64) * stb + h * sth + item.to(tl.int64) * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _entry_block(e_base, W, e0, end, b, h, swb, swt, swh, BR: tl.constexpr, KSEL: tl.constexpr):
    """The block of BR entries (token * KSEL + slot) of a chunk's list at e0: token, slot, weight, in range."""
    pos = e0 + tl.arange(0, BR)
    ok = pos < end
    entry = tl.load(e_base + pos, mask=ok, other=0)
    tok, sel = entry // KSEL, entry % KSEL
    w = tl.load(W + b.to(tl.int64) * swb + tok.to(tl.int64) * swt + h * swh + sel, mask=ok, other=0.0)
    return tok, sel, w, ok


@triton.jit
def _chunk_kv(Kmem, V, b, h, c, skb, skt, skh, S: tl.constexpr, D: tl.constexpr):
    """Chunk c's keys and values (S, D) for KV head h, and their offsets."""
    kv_off = (b.to(tl.int64) * skb + (c.to(tl.int64) * S + tl.arange(0, S))[:, None] * skt + h * skh
              + tl.arange(0, D)[None, :])
    return kv_off, tl.load(Kmem + kv_off), tl.load(V + kv_off)


@triton.jit
def _entry_rows(Q, e_base, W, e0, end, b, h, swb, swt, swh, sqb, sqt, sqh, BR: tl.constexpr, KSEL: tl.constexpr,
                G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
    """A chunk's block of BR entries at e0 as (entry, query head) rows: per entry its token, slot, weight and
    range; per row its token, range, head and Q/dO offsets; and the rows' queries."""
    tok, sel, w, ok = _entry_block(e_base, W, e0, end, b, h, swb, swt, swh, BR, KSEL)
    g = tl.arange(0, BR * G_PAD) % G_PAD
    head = (h * G + g).to(tl.int64)
    tok_row = _rows_from_tokens(tok, BR, G_PAD).to(tl.int64)
    row_ok = _rows_from_tokens(ok, BR, G_PAD) & (g < G)
    row_off = b.to(tl.int64) * sqb + tok_row[:, None] * sqt + head[:, None] * sqh + tl.arange(0, D)[None, :]
    return tok, sel, w, ok, tok_row, row_ok, head, row_off, tl.load(Q + row_off, mask=row_ok[:, None], other=0.0)


@triton.jit
def _store_dkdv(dk, dv, slot, DK, DV, PART_DK, PART_DV, kv_off, b, h, spb, sph, sps, scale,
                S: tl.constexpr, D: tl.constexpr):
    """A work item's dK, dV: final when it is its chunk's only item, else a partial for the reduce kernel."""
    if slot < 0:
        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty))
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty))
    else:
        p_off = (b.to(tl.int64) * spb + h * sph + slot.to(tl.int64) * sps
                 + tl.arange(0, S)[:, None] * D + tl.arange(0, D)[None, :])
        tl.store(PART_DK + p_off, dk)
        tl.store(PART_DV + p_off, dv)


@_tuned("G", "D", "S", "KSEL", "BT")
@triton.jit
def _hsa_fwd_kernel(
    Q, Kmem, V, W, IDX, UNION, COUNT, O,
    sqb, sqt, sqh, skb, skt, skh, swb, swt, swh, sub, suh, sun, scb, sch, sob, sot, soh,
    T, HKV, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BT: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    KSEL: tl.constexpr, K_PAD: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    d = tl.arange(0, D)
    tok, row_ok, head, row_off, q = _block_queries(Q, sqb, sqt, sqh, pid_t, b, h, T, BT, G, G_PAD, D)
    idx, w, _sel_off, _sel_ok = _block_picks(IDX, W, b, h, pid_t, swb, swt, swh, T, BT, KSEL, K_PAD)
    acc = tl.zeros((BT * G_PAD, D), dtype=tl.float32)
    u_base = UNION + b.to(tl.int64) * sub + h * suh + pid_t.to(tl.int64) * sun
    n = tl.load(COUNT + b * scb + h * sch + pid_t)
    s_idx = tl.arange(0, S)
    for u in range(0, n):
        c = tl.load(u_base + u).to(tl.int64)
        w_row = _rows_from_tokens(tl.sum(tl.where(idx == c, w, 0.0), axis=1), BT, G_PAD)
        kv_off = b.to(tl.int64) * skb + (c * S + s_idx).to(tl.int64) * skt + h * skh
        kt = tl.load(Kmem + kv_off[None, :] + d[:, None])  # (D, S)
        v = tl.load(V + kv_off[:, None] + d[None, :])  # (S, D)
        p = _chunk_softmax(q, kt, scale)
        acc += w_row[:, None] * tl.dot(p.to(v.dtype), v)
    tl.store(O + b.to(tl.int64) * sob + tok.to(tl.int64)[:, None] * sot + head[:, None] * soh + d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@_tuned("G", "D", "S", "KSEL", "BT")
@triton.jit
def _hsa_bwd_dq_kernel(
    Q, Kmem, V, W, IDX, UNION, COUNT, DO, DQ, DW,
    sqb, sqt, sqh, skb, skt, skh, swb, swt, swh, sub, suh, sun, scb, sch,
    T, HKV, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BT: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    KSEL: tl.constexpr, K_PAD: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    d = tl.arange(0, D)
    tok, row_ok, head, row_off, q = _block_queries(Q, sqb, sqt, sqh, pid_t, b, h, T, BT, G, G_PAD, D)
    do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
    idx, w, sel_off, sel_ok = _block_picks(IDX, W, b, h, pid_t, swb, swt, swh, T, BT, KSEL, K_PAD)
    dq = tl.zeros((BT * G_PAD, D), dtype=tl.float32)
    dw = tl.zeros((BT, K_PAD), dtype=tl.float32)
    u_base = UNION + b.to(tl.int64) * sub + h * suh + pid_t.to(tl.int64) * sun
    n = tl.load(COUNT + b * scb + h * sch + pid_t)
    s_idx = tl.arange(0, S)
    for u in range(0, n):
        c = tl.load(u_base + u).to(tl.int64)
        picked = idx == c
        w_row = _rows_from_tokens(tl.sum(tl.where(picked, w, 0.0), axis=1), BT, G_PAD)
        kv_off = b.to(tl.int64) * skb + (c * S + s_idx).to(tl.int64) * skt + h * skh
        kt = tl.load(Kmem + kv_off[None, :] + d[:, None])  # (D, S)
        vt = tl.load(V + kv_off[None, :] + d[:, None])  # (D, S)
        p = _chunk_softmax(q, kt, scale)
        dp = tl.dot(do, vt)  # (M, S)
        delta = tl.sum(p * dp, axis=1)  # <o_c, dO> per row
        delta_tok = tl.sum(tl.reshape(delta, (BT, G_PAD)), axis=1)  # summed over the group's heads
        dw += tl.where(picked, delta_tok[:, None], 0.0)
        ds = w_row[:, None] * p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    tl.store(DQ + row_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DW + sel_off, dw, mask=sel_ok)


@_tuned("G", "D", "S", "KSEL", "BR", "WITH_DQ")
@triton.jit
def _hsa_bwd_dkdv_kernel(
    Q, Kmem, V, W, ENTRIES, TABLE, DO, DK, DV, PART_DK, PART_DV, DQP, DW,
    sqb, sqt, sqh, skb, skt, skh, swb, swt, swh, seb, seh, stb, sth, spb, sph, sps, sdb, sdt, sds, sdh,
    T, HKV, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BR: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    KSEL: tl.constexpr, WITH_DQ: tl.constexpr,
):
    """dK, dV of one work item's chunk (or a partial of them) over its (token, slot) entries; ``WITH_DQ``
    (the chunk-centric backward of ``by_chunk.py``) also writes each entry's dQ share DQP[b, token, slot,
    head] and its dw."""
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    c, start, end, slot = _work_item(TABLE, stb, sth, tl.program_id(0), b, h)
    if c >= 0:
        kv_off, k, v = _chunk_kv(Kmem, V, b, h, c, skb, skt, skh, S, D)
        dk = tl.zeros((S, D), dtype=tl.float32)
        dv = tl.zeros((S, D), dtype=tl.float32)
        e_base = ENTRIES + b.to(tl.int64) * seb + h * seh
        for e0 in range(start, end, BR):
            tok, sel, w, ok, tok_row, row_ok, head, row_off, q = _entry_rows(
                Q, e_base, W, e0, end, b, h, swb, swt, swh, sqb, sqt, sqh, BR, KSEL, G, G_PAD, D)
            do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
            p = _chunk_softmax(q, tl.trans(k), scale)  # (M, S)
            dp = tl.dot(do, tl.trans(v))
            delta = tl.sum(p * dp, axis=1)  # <o_c, dO> per row; 0 on padded rows (dO = 0)
            wp = _rows_from_tokens(w, BR, G_PAD)[:, None] * p
            dv += tl.dot(tl.trans(wp.to(do.dtype)), do)
            ds = wp * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            if WITH_DQ:
                sel_row = _rows_from_tokens(sel, BR, G_PAD).to(tl.int64)
                dq = tl.dot(ds.to(k.dtype), k) * scale
                dq_off = b.to(tl.int64) * sdb + tok_row[:, None] * sdt + sel_row[:, None] * sds + head[:, None] * sdh
                tl.store(DQP + dq_off + tl.arange(0, D)[None, :], dq.to(DQP.dtype.element_ty), mask=row_ok[:, None])
                dw = tl.sum(tl.reshape(delta, (BR, G_PAD)), axis=1)  # summed over the group's heads
                tl.store(DW + b.to(tl.int64) * swb + tok.to(tl.int64) * swt + h * swh + sel, dw, mask=ok)
        _store_dkdv(dk, dv, slot, DK, DV, PART_DK, PART_DV, kv_off, b, h, spb, sph, sps, scale, S, D)


@triton.jit
def _hsa_bwd_dkdv_reduce_kernel(
    NITEMS, FIRST, PART_DK, PART_DV, DK, DV,
    snb, snh, spb, sph, sps, skb, skt, skh,
    HKV, scale, S: tl.constexpr, D: tl.constexpr,
):
    """Adds the partials of each split chunk in item order (deterministic) and writes dK, dV."""
    c = tl.program_id(0)
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    n = tl.load(NITEMS + b.to(tl.int64) * snb + h * snh + c)
    if n > 1:
        first = tl.load(FIRST + b.to(tl.int64) * snb + h * snh + c)
        d = tl.arange(0, D)
        s_idx = tl.arange(0, S)
        tile = s_idx[:, None] * D + d[None, :]
        dk = tl.zeros((S, D), dtype=tl.float32)
        dv = tl.zeros((S, D), dtype=tl.float32)
        for i in range(0, n):
            p_off = b.to(tl.int64) * spb + h * sph + (first + i).to(tl.int64) * sps + tile
            dk += tl.load(PART_DK + p_off)
            dv += tl.load(PART_DV + p_off)
        kv_off = b.to(tl.int64) * skb + (c.to(tl.int64) * S + s_idx)[:, None] * skt + h * skh + d[None, :]
        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty))
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty))


def _check(q, k, v, weights, indices, chunk_size):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads {H} are not divisible by memory heads {Hkv}")
    if k.shape[1] % chunk_size:
        raise ValueError(f"memory length {k.shape[1]} is not a multiple of chunk_size={chunk_size}")
    if D < 16 or D & (D - 1) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton kernels need head_dim and chunk_size powers of two >= 16, got {D}, {chunk_size}")
    if indices.shape != weights.shape or indices.shape[:3] != (B, T, Hkv):
        raise ValueError(f"indices {tuple(indices.shape)} / weights {tuple(weights.shape)} must be (B, T, Hkv, K)")


def hsa_forward(q, k, v, weights, indices, chunk_size: int, scale: float, by_chunk: bool = False):
    """The output and the index the backward reuses: the token blocks' chunk union (union, count), or,
    ``by_chunk``, the chunks' entry lists (entries, offsets) of the chunk-centric kernels (``by_chunk.py``)."""
    _check(q, k, v, weights, indices, chunk_size)
    # the memory may be a strided prefix of an inference cache: never copy it, it can be gigabytes
    q, k, v = q.contiguous(), inner_contiguous(k), inner_contiguous(v)
    weights, indices = weights.float().contiguous(), indices.to(torch.int32).contiguous()
    if by_chunk:
        from hsa_lightning.kernels.hsa.by_chunk import forward_by_chunk

        return forward_by_chunk(q, k, v, weights, indices, chunk_size, scale)
    B, T, H, D = q.shape
    Hkv, K = k.shape[2], indices.shape[-1]
    bt, g_pad = tile_shape(H // Hkv)
    union, count = block_union(indices, bt)
    o = torch.empty_like(q)
    grid = (triton.cdiv(T, bt), B * Hkv)
    _hsa_fwd_kernel[grid](
        q, k, v, weights, indices, union, count, o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        weights.stride(0), weights.stride(1), weights.stride(2),
        union.stride(0), union.stride(1), union.stride(2), count.stride(0), count.stride(1),
        o.stride(0), o.stride(1), o.stride(2),
        T, Hkv, scale,
        G=H // Hkv, G_PAD=g_pad, BT=bt, S=chunk_size, D=D, KSEL=K, K_PAD=_pow2(K),
    )
    return o, union, count


def hsa_backward(do, q, k, v, weights, indices, index_a, index_b, chunk_size: int, scale: float,
                 by_chunk: bool = False):
    """``index_a``, ``index_b``: the index ``hsa_forward`` returned (union and count; ``by_chunk``:
    entries and offsets)."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    weights, indices = weights.float().contiguous(), indices.to(torch.int32).contiguous()
    if by_chunk:
        from hsa_lightning.kernels.hsa.by_chunk import backward_by_chunk

        return backward_by_chunk(do, q, k, v, weights, indices, index_a, index_b, chunk_size, scale)
    union, count = index_a, index_b
    B, T, H, D = q.shape
    Lm, Hkv, K = k.shape[1], k.shape[2], indices.shape[-1]
    G = H // Hkv
    bt, g_pad = tile_shape(G)
    dq = torch.empty_like(q)
    dw = torch.empty_like(weights)
    _hsa_bwd_dq_kernel[(triton.cdiv(T, bt), B * Hkv)](
        q, k, v, weights, indices, union, count, do, dq, dw,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        weights.stride(0), weights.stride(1), weights.stride(2),
        union.stride(0), union.stride(1), union.stride(2), count.stride(0), count.stride(1),
        T, Hkv, scale,
        G=G, G_PAD=g_pad, BT=bt, S=chunk_size, D=D, KSEL=K, K_PAD=_pow2(K),
    )
    entries, offsets = chunk_csr(indices, weights, Lm // chunk_size)
    dk, dv = dkdv_pass(do, q, k, v, weights, entries, offsets, chunk_size, scale, bt)
    return dq, dk, dv, dw


def dkdv_pass(do, q, k, v, weights, entries, offsets, chunk_size: int, scale: float, block: int,
              dq_partial: torch.Tensor | None = None, dw: torch.Tensor | None = None):
    """dK, dV over the chunks' entry lists, ``block`` entries at a time; given ``dq_partial`` (B, T, K, H, D)
    and ``dw``, the same pass also writes every entry's dQ share and dw (the chunk-centric backward)."""
    B, T, H, D = q.shape
    Hkv, K = k.shape[2], weights.shape[-1]
    table, n_items, first_slot, _, n_slots = dkdv_work(offsets, T * K, block)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    part_dk = torch.empty(B, Hkv, n_slots, chunk_size, D, device=k.device, dtype=torch.float32)
    part_dv = torch.empty_like(part_dk)
    with_dq = dq_partial is not None
    dq_strides = dq_partial.stride()[:4] if with_dq else (0, 0, 0, 0)
    _hsa_bwd_dkdv_kernel[(table.shape[2], B * Hkv)](
        q, k, v, weights, entries, table, do, dk, dv, part_dk, part_dv,
        dq_partial if with_dq else dk, dw if with_dq else dk,  # unused without dQ
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        weights.stride(0), weights.stride(1), weights.stride(2),
        entries.stride(0), entries.stride(1), table.stride(0), table.stride(1),
        part_dk.stride(0), part_dk.stride(1), part_dk.stride(2), *dq_strides,
        T, Hkv, scale,
        G=H // Hkv, G_PAD=_pow2(H // Hkv), BR=block, S=chunk_size, D=D, KSEL=K, WITH_DQ=with_dq,
    )
    _hsa_bwd_dkdv_reduce_kernel[(k.shape[1] // chunk_size, B * Hkv)](
        n_items, first_slot, part_dk, part_dv, dk, dv,
        n_items.stride(0), n_items.stride(1), part_dk.stride(0), part_dk.stride(1), part_dk.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        Hkv, scale, S=chunk_size, D=D,
    )
    return dk, dv


# -- autograd: a custom op with a fake implementation, so torch.compile treats it as opaque ----------
@torch.library.custom_op("hsa_lightning::hsa_attention", mutates_args=())
def _hsa_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                      indices: torch.Tensor, chunk_size: int, scale: float,
                      by_chunk: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hsa_forward(q, k, v, weights, indices, chunk_size, scale, by_chunk)


@_hsa_attention_op.register_fake
def _(q, k, v, weights, indices, chunk_size, scale, by_chunk):
    B, T, H, _ = q.shape
    Hkv, K = k.shape[2], indices.shape[-1]
    if by_chunk:  # entries, offsets
        index = ((B, Hkv, T * K), (B, Hkv, k.shape[1] // chunk_size + 1))
    else:  # union, count
        bt, _ = tile_shape(H // Hkv)
        nb = -(-T // bt)
        index = ((B, Hkv, nb, bt * K), (B, Hkv, nb))
    return (torch.empty_like(q), *(q.new_empty(shape, dtype=torch.int32) for shape in index))


@torch.library.custom_op("hsa_lightning::hsa_attention_backward", mutates_args=())
def _hsa_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               weights: torch.Tensor, indices: torch.Tensor, index_a: torch.Tensor,
                               index_b: torch.Tensor, chunk_size: int, scale: float,
                               by_chunk: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return hsa_backward(do, q, k, v, weights, indices, index_a, index_b, chunk_size, scale, by_chunk)


@_hsa_attention_backward_op.register_fake
def _(do, q, k, v, weights, indices, index_a, index_b, chunk_size, scale, by_chunk):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(weights, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, weights, indices, chunk_size, scale, by_chunk = inputs
    _, index_a, index_b = output
    ctx.save_for_backward(q, k, v, weights, indices, index_a, index_b)
    ctx.mark_non_differentiable(index_a, index_b)
    ctx.chunk_size, ctx.scale, ctx.by_chunk = chunk_size, scale, by_chunk


def _backward(ctx, do, _da, _db):
    q, k, v, weights, indices, index_a, index_b = ctx.saved_tensors
    dq, dk, dv, dw = _hsa_attention_backward_op(do, q, k, v, weights, indices, index_a, index_b,
                                                ctx.chunk_size, ctx.scale, ctx.by_chunk)
    return dq, dk, dv, dw.to(weights.dtype), None, None, None, None


_hsa_attention_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_kernel_slice(q: torch.Tensor, top_k: int) -> int:
    """Query tokens per call of the chunk-centric kernels: their per-slot partial outputs (and dQ shares,
    B*T*k*H*D) stay within CHUNK_PARTIALS_MAX_BYTES, so long sequences run as a few equal query slices."""
    B, T, H, D = q.shape
    slices = max(1, math.ceil(B * T * top_k * H * D * q.element_size() / CHUNK_PARTIALS_MAX_BYTES))
    return math.ceil(T / slices)


def uses_chunk_kernels(q: torch.Tensor, memory_len: int, group: int, top_k: int) -> bool:
    """Whether ``hsa_attention`` takes the chunk-centric kernels for queries ``q`` (B, T, H, D): for small
    groups G, where a token tile's union of chunks wastes most of each K/V tile (docs/benchmarks.md), when
    each query slice's picks fill the chunks' lists (training, prefill; not decode over a long memory,
    where most chunks have none)."""
    T = min(q.shape[1], chunk_kernel_slice(q, top_k))
    return _pow2(group) <= BY_CHUNK_MAX_GROUP and T * top_k >= memory_len


def hsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                  indices: torch.Tensor, chunk_size: int, scale: float | None = None,
                  by_chunk: bool | None = None) -> torch.Tensor:
    """Triton HSA: same contract as ``hsa_attention_reference`` (q (B,T,H,D); k, v (B,Lm,Hkv,D);
    weights float and indices int64 (B,T,Hkv,K)); differentiable in q, k, v and weights. ``by_chunk``
    picks the kernels (chunk-centric or token-centric); None decides by the group size."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = common_dtype(q, k, v)
    if by_chunk is None:
        by_chunk = uses_chunk_kernels(q, k.shape[1], q.shape[2] // k.shape[2], indices.shape[-1])
    T = q.shape[1]
    step = chunk_kernel_slice(q, indices.shape[-1]) if by_chunk else T
    if step >= T:
        return _hsa_attention_op(q, k, v, weights, indices, chunk_size, scale, by_chunk)[0]
    # Every token's output depends only on its own picks, so query slices are exact; autograd adds the
    # slices' dK/dV in a fixed order (still deterministic).
    return torch.cat([_hsa_attention_op(q[:, s:s + step], k, v, weights[:, s:s + step], indices[:, s:s + step],
                                        chunk_size, scale, by_chunk)[0] for s in range(0, T, step)], dim=1)


def inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its innermost dimension is dense (the kernels take the other strides), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the narrowest dtype present (autocast can hand bf16 queries and fp32 normed keys)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:  # a loop, not min(key=...), which torch.compile cannot trace (a graph break)
        if torch.finfo(t.dtype).bits < torch.finfo(dtype).bits:
            dtype = t.dtype
    return tuple(t.to(dtype) for t in tensors)
