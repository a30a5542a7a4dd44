"""Reference HSA attention: gather each selected chunk, softmax within it, fuse by weight.

This is the executable spec the Triton kernels are tested against. It is float64-capable and
loops over the K slots so that memory stays O(B*T*Hkv*S*D) rather than O(...*K).

Shapes: q (B, T, H, D); k, v (B, Lm, Hkv, D) with Lm a multiple of chunk_size;
weights (B, T, Hkv, K) float; indices (B, T, Hkv, K) int64, every index a valid chunk.
H = G * Hkv for any group size G >= 1.
"""
from __future__ import annotations

import math

import torch


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gather_chunk(mem: torch.Tensor, idx: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """mem (B, Lm, Hkv, D), idx (B, T, Hkv) -> the selected chunks (B, T, Hkv, S, D)."""
    B, Lm, Hkv, D = mem.shape
    chunks = mem.view(B, Lm // chunk_size, chunk_size, Hkv, D)
    b = torch.arange(B, device=mem.device)[:, None, None]
    h = torch.arange(Hkv, device=mem.device)[None, None, :]
    return chunks[b, idx, :, h]  # advanced indices first: (B, T, Hkv, S, D)


def hsa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """o[t, h] = sum_k weights[t, g(h), k] * softmax(q[t, h] . K[idx_k]^T * scale) V[idx_k]."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc_dtype = _accumulation_dtype(q)
    qg = q.view(B, T, Hkv, G, D).to(acc_dtype)
    out = torch.zeros(B, T, Hkv, G, D, dtype=acc_dtype, device=q.device)
    for slot in range(indices.shape[-1]):
        idx = indices[..., slot]
        ks = _gather_chunk(k, idx, chunk_size).to(acc_dtype)
        vs = _gather_chunk(v, idx, chunk_size).to(acc_dtype)
        p = torch.softmax(torch.einsum("bthgd,bthsd->bthgs", qg, ks) * scale, dim=-1)
        o = torch.einsum("bthgs,bthsd->bthgd", p, vs)
        out = out + weights[..., slot, None, None].to(acc_dtype) * o
    return out.view(B, T, H, D).to(q.dtype)


def joint_chunk_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    chunk_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Ablation (NSA/MoBA-style): one softmax over the union of the selected chunks' keys, each slot's
    logits shifted by the log of its weight.

    ``weights`` (B, T, Hkv, K) >= 0; a slot of weight 0 is padding, and a token with no real slot gets
    output 0. Fusion ``joint`` passes the slot mask (all shifts 0: the retrieval scores do not enter and
    retrieval learns nothing through this path, as in MoBA); ``joint_scored`` passes the softmax fusion
    weights, so each chunk's keys compete with its retrieval score added (the softmax's normaliser cancels).
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G, K, S = H // Hkv, indices.shape[-1], chunk_size
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc_dtype = _accumulation_dtype(q)
    qg = q.view(B, T, Hkv, G, D).to(acc_dtype)
    ks = torch.stack([_gather_chunk(k, indices[..., j], S) for j in range(K)], dim=3).to(acc_dtype)
    vs = torch.stack([_gather_chunk(v, indices[..., j], S) for j in range(K)], dim=3).to(acc_dtype)
    logits = torch.einsum("bthgd,bthksd->bthgks", qg, ks) * scale
    valid = weights > 0
    prior = torch.log(torch.where(valid, weights, torch.ones_like(weights))).to(acc_dtype)
    logits = logits + prior[:, :, :, None, :, None]
    any_valid = valid.any(-1)  # (B, T, Hkv)
    # A row without a valid slot attends to slot 0 and is zeroed afterwards: no NaN reaches backward.
    attend = valid.clone()
    attend[..., 0] |= ~any_valid
    logits = logits.masked_fill(~attend[:, :, :, None, :, None], float("-inf")).flatten(-2)
    p = torch.softmax(logits, dim=-1).view(B, T, Hkv, G, K, S)
    out = torch.einsum("bthgks,bthksd->bthgd", p, vs) * any_valid[..., None, None]
    return out.reshape(B, T, H, D).to(q.dtype)

