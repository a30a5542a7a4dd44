"""Fused retrieval in Triton: landmark scores + visibility + top-k, never building the [T, C] matrix.

Forward: one program per (block of tokens, batch, KV head) streams the landmarks of the visible chunks
N at a time, scores them with one matmul, and keeps a running top-N per token in registers. Scores and
chunk ids travel together as one int64 key (order-preserving float bits in the high word, the chunk id
in the low word), so the running top-N is an elementwise max of the current top (descending) and the
new block (ascending) -- which holds the N largest of both -- followed by a sort. The result is then
re-sorted most recent first, exactly as ``naive.select_chunks`` orders it.

Backward (only the selected scores carry gradient): dq_slc is token-centric over each token's k picks;
dlandmarks is chunk-centric over the compact inverse index (no atomics, deterministic).
Same semantics as ``naive.retrieval_scores`` + ``naive.select_chunks`` without noise.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hsa_lightning.kernels.hsa.parallel import _pow2, chunk_csr, common_dtype, inner_contiguous

TOKENS_PER_BLOCK = 64


@triton.jit
def _sortable(bits):
    """fp32 bits (int32) -> int32 that orders like the floats."""
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _retrieval_fwd_kernel(
    QS, LMK, IDX, SEL,
    sqb, sqt, sqh, slb, slc, slh, sob, sot, soh,
    T, T0, C, HKV, scale,
    S: tl.constexpr, DR: tl.constexpr, BT: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    t = pid_t * BT + tl.arange(0, BT)
    t_ok = t < T
    dr = tl.arange(0, DR)
    q = tl.load(QS + b.to(tl.int64) * sqb + t.to(tl.int64)[:, None] * sqt + h * sqh + dr[None, :],
                mask=t_ok[:, None], other=0.0)
    n_vis = (T0 + t) // S  # query row t sits at position T0 + t
    lowest = tl.full((BT, N), -9223372036854775807 - 1, dtype=tl.int64)
    top = lowest
    last_visible = tl.minimum((T0 + pid_t * BT + BT - 1) // S, C)  # chunks [0, last_visible) matter here
    j = tl.arange(0, N)
    for c0 in range(0, last_visible, N):
        c = c0 + j
        lmk = tl.load(LMK + b.to(tl.int64) * slb + c.to(tl.int64)[None, :] * slc + h * slh + dr[:, None],
                      mask=(c < C)[None, :], other=0.0)  # (DR, N)
        s = tl.dot(q, lmk) * scale
        key = (_sortable(s.to(tl.int32, bitcast=True)).to(tl.int64) << 32) | c.to(tl.int64)[None, :]
        key = tl.where(c[None, :] < n_vis[:, None], key, lowest)
        new = tl.sort(key, dim=1, descending=False)
        top = tl.sort(tl.maximum(top, new), dim=1, descending=True)
    # Most recent first among the valid slots (j < min(K, visible)); padding slots get chunk 0.
    valid = (j[None, :] < K) & (j[None, :] < n_vis[:, None])
    chunk = (top & 0xFFFFFFFF).to(tl.int64)
    sk = (top >> 32).to(tl.int32)
    bits = tl.where(sk >= 0, sk, sk ^ 0x7FFFFFFF)
    key2 = tl.where(valid, (chunk << 32) | (bits.to(tl.int64) & 0xFFFFFFFF), lowest)
    key2 = tl.sort(key2, dim=1, descending=True)
    ok2 = key2 != lowest
    idx = tl.where(ok2, key2 >> 32, 0)
    sel = tl.where(ok2, (key2 & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
    out = b.to(tl.int64) * sob + t.to(tl.int64)[:, None] * sot + h * soh + j[None, :]
    store_ok = t_ok[:, None] & (j[None, :] < K)
    tl.store(IDX + out, idx, mask=store_ok)
    tl.store(SEL + out, sel, mask=store_ok)


@triton.jit
def _retrieval_dq_kernel(
    DSEL, IDX, LMK, DQ,
    sob, sot, soh, slb, slc, slh, sqb, sqt, sqh,
    T, HKV, scale,
    DR: tl.constexpr, BT: tl.constexpr, K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    t = pid_t * BT + tl.arange(0, BT)
    t_ok = t < T
    dr = tl.arange(0, DR)
    acc = tl.zeros((BT, DR), dtype=tl.float32)
    base = b.to(tl.int64) * sob + t.to(tl.int64) * sot + h * soh
    for j in range(0, K):
        ds = tl.load(DSEL + base + j, mask=t_ok, other=0.0)
        c = tl.load(IDX + base + j, mask=t_ok, other=0)
        rows = tl.load(LMK + b.to(tl.int64) * slb + c[:, None] * slc + h * slh + dr[None, :], mask=t_ok[:, None],
                       other=0.0)
        acc += ds[:, None] * rows.to(tl.float32)
    tl.store(DQ + b.to(tl.int64) * sqb + t.to(tl.int64)[:, None] * sqt + h * sqh + dr[None, :],
             (acc * scale).to(DQ.dtype.element_ty), mask=t_ok[:, None])


@triton.jit
def _retrieval_dlmk_kernel(
    DSEL, QS, ENTRIES, OFFSETS, DL,
    sob, sot, soh, sqb, sqt, sqh, seb, seh, sfb, sfh, slb, slc, slh,
    HKV, scale,
    DR: tl.constexpr, BR: tl.constexpr, K: tl.constexpr,
):
    c = tl.program_id(0)
    b = tl.program_id(1) // HKV
    h = tl.program_id(1) % HKV
    dr = tl.arange(0, DR)
    off = OFFSETS + b.to(tl.int64) * sfb + h * sfh + c
    start = tl.load(off)
    end = tl.load(off + 1)
    acc = tl.zeros((DR,), dtype=tl.float32)
    for e0 in range(start, end, BR):
        pos = e0 + tl.arange(0, BR)
        ok = pos < end
        entry = tl.load(ENTRIES + b.to(tl.int64) * seb + h * seh + pos, mask=ok, other=0)
        tok, slot = (entry // K).to(tl.int64), entry % K
        ds = tl.load(DSEL + b.to(tl.int64) * sob + tok * sot + h * soh + slot, mask=ok, other=0.0)
        q = tl.load(QS + b.to(tl.int64) * sqb + tok[:, None] * sqt + h * sqh + dr[None, :], mask=ok[:, None],
                    other=0.0)
        acc += tl.sum(ds[:, None] * q.to(tl.float32), axis=0)
    tl.store(DL + b.to(tl.int64) * slb + c.to(tl.int64) * slc + h * slh + dr, (acc * scale).to(DL.dtype.element_ty))


def _check(q_slc, landmarks):
    dr = q_slc.shape[-1]
    if dr < 16 or dr & (dr - 1):
        raise ValueError(f"the fused retrieval needs a per-head retrieval width that is a power of two >= 16, got {dr}")


def _forward(q_slc: torch.Tensor, landmarks: torch.Tensor, top_k: int, chunk_size: int, query_start: int = 0):
    _check(q_slc, landmarks)
    # strided views are fine (an inference cache's landmarks are a prefix of a larger buffer); only the
    # innermost dimension must be dense
    q_slc, landmarks = inner_contiguous(q_slc), inner_contiguous(landmarks)
    B, T, H, DR = q_slc.shape
    C = landmarks.shape[1]
    K = min(top_k, C)
    idx = torch.empty(B, T, H, K, device=q_slc.device, dtype=torch.int64)
    sel = torch.empty(B, T, H, K, device=q_slc.device, dtype=torch.float32)
    _retrieval_fwd_kernel[(triton.cdiv(T, TOKENS_PER_BLOCK), B * H)](
        q_slc, landmarks, idx, sel,
        q_slc.stride(0), q_slc.stride(1), q_slc.stride(2),
        landmarks.stride(0), landmarks.stride(1), landmarks.stride(2),
        idx.stride(0), idx.stride(1), idx.stride(2),
        T, query_start, C, H, 1.0 / math.sqrt(DR), S=chunk_size, DR=DR, BT=TOKENS_PER_BLOCK, N=max(16, _pow2(K)), K=K,
    )
    positions = torch.arange(query_start, query_start + T, device=idx.device)
    valid = torch.arange(K, device=idx.device) < (positions // chunk_size)[:, None]
    return idx, valid.expand(B, H, T, K).permute(0, 2, 1, 3).contiguous(), sel


def _backward(dsel, q_slc, landmarks, idx, valid):
    q_slc, landmarks = q_slc.contiguous(), landmarks.contiguous()
    B, T, H, DR = q_slc.shape
    C, K = landmarks.shape[1], idx.shape[-1]
    scale = 1.0 / math.sqrt(DR)
    dsel = torch.where(valid, dsel, 0.0).float().contiguous()
    dq = torch.empty_like(q_slc)
    _retrieval_dq_kernel[(triton.cdiv(T, TOKENS_PER_BLOCK), B * H)](
        dsel, idx, landmarks, dq,
        dsel.stride(0), dsel.stride(1), dsel.stride(2),
        landmarks.stride(0), landmarks.stride(1), landmarks.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        T, H, scale, DR=DR, BT=TOKENS_PER_BLOCK, K=K,
    )
    entries, offsets = chunk_csr(idx, valid, C)
    dl = torch.empty_like(landmarks)
    _retrieval_dlmk_kernel[(C, B * H)](
        dsel, q_slc, entries, offsets, dl,
        dsel.stride(0), dsel.stride(1), dsel.stride(2), q_slc.stride(0), q_slc.stride(1), q_slc.stride(2),
        entries.stride(0), entries.stride(1), offsets.stride(0), offsets.stride(1),
        dl.stride(0), dl.stride(1), dl.stride(2),
        H, scale, DR=DR, BR=64, K=K,
    )
    return dq, dl


# -- a custom op with a fake implementation, so torch.compile treats it as opaque --------------------
@torch.library.custom_op("hsa_lightning::select_chunks", mutates_args=())
def _select_op(q_slc: torch.Tensor, landmarks: torch.Tensor, top_k: int, chunk_size: int,
               query_start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q_slc, landmarks, top_k, chunk_size, query_start)


@_select_op.register_fake
def _(q_slc, landmarks, top_k, chunk_size, query_start):
    B, T, H, _ = q_slc.shape
    shape = (B, T, H, min(top_k, landmarks.shape[1]))
    return (q_slc.new_empty(shape, dtype=torch.int64), q_slc.new_empty(shape, dtype=torch.bool),
            q_slc.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op("hsa_lightning::select_chunks_backward", mutates_args=())
def _select_backward_op(dsel: torch.Tensor, q_slc: torch.Tensor, landmarks: torch.Tensor, idx: torch.Tensor,
                        valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dsel, q_slc, landmarks, idx, valid)


@_select_backward_op.register_fake
def _(dsel, q_slc, landmarks, idx, valid):
    return torch.empty_like(q_slc), torch.empty_like(landmarks)


def _setup_context(ctx, inputs, output):
    q_slc, landmarks, _, _, query_start = inputs
    if query_start:
        raise NotImplementedError("the fused retrieval has no backward for query_start > 0 (inference only)")
    idx, valid, _ = output
    ctx.save_for_backward(q_slc, landmarks, idx, valid)
    ctx.mark_non_differentiable(idx, valid)


def _autograd_backward(ctx, _didx, _dvalid, dsel):
    q_slc, landmarks, idx, valid = ctx.saved_tensors
    dq, dl = _select_backward_op(dsel, q_slc, landmarks, idx, valid)
    return dq, dl, None, None, None


_select_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def select_chunks_fused(q_slc: torch.Tensor, landmarks: torch.Tensor, top_k: int, chunk_size: int,
                        query_start: int = 0):
    """(indices, valid, selected_scores), each (B, T, Hkv, min(top_k, C)); equal to
    ``select_chunks(retrieval_scores(..., query_start=query_start))`` plus the gathered scores,
    differentiable in the scores when ``query_start`` is 0."""
    q_slc, landmarks = common_dtype(q_slc, landmarks)
    return _select_op(q_slc, landmarks, top_k, chunk_size, query_start)
