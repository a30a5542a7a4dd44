"""Reference retrieval: landmark scores, the visibility rule, top-k selection and fusion weights.

Chunk i is visible to token t iff (i+1) * S <= t: complete and strictly in the past. The token's
own chunk is covered by SWA only. With document masking (``doc_start``, (B, T): the first position of
each token's document) a chunk must also start at or after that position. Shapes: q_slc (B, T, Hkv, Dr); landmarks (B, C, Hkv, Dr);
scores (B, T, Hkv, C). This materialises the [T, C] score matrix; the fused Triton op must not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def visible_chunks(T: int, C: int, chunk_size: int, device: torch.device,
                   doc_start: torch.Tensor | None = None, query_start: int = 0) -> torch.Tensor:
    """(T, C) bool: chunk i visible to token t iff (i + 1) * chunk_size <= t; with ``doc_start``
    (B, T, C) and also i * chunk_size >= doc_start[b, t]. Query row r sits at position
    ``query_start + r`` (incremental inference reads a segment against all earlier chunks)."""
    t = torch.arange(query_start, query_start + T, device=device)[:, None]
    i = torch.arange(C, device=device)[None, :]
    visible = (i + 1) * chunk_size <= t
    if doc_start is None:
        return visible
    return visible[None] & (i[None] * chunk_size >= doc_start[:, :, None])


def retrieval_scores(q_slc: torch.Tensor, landmarks: torch.Tensor, chunk_size: int,
                     doc_start: torch.Tensor | None = None, query_start: int = 0) -> torch.Tensor:
    """s[t, i] = <q_slc[t], lmk[i]> / sqrt(Dr) in float32 (float64 stays), -inf where not visible."""
    dtype = torch.float64 if q_slc.dtype == torch.float64 else torch.float32
    s = torch.einsum("bthd,bchd->bthc", q_slc.to(dtype), landmarks.to(dtype)) / math.sqrt(q_slc.shape[-1])
    mask = visible_chunks(q_slc.shape[1], landmarks.shape[1], chunk_size, q_slc.device, doc_start, query_start)
    mask = mask[None, :, None, :] if doc_start is None else mask[:, :, None, :]
    return s.masked_fill(~mask, float("-inf"))


def select_chunks(
    scores: torch.Tensor, top_k: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k visible chunks per (token, head), most recent first.

    Returns ``indices`` (B, T, Hkv, K) int64 with K = min(top_k, C) and ``valid`` (same shape, bool).
    Slot j is valid iff it holds a visible (finite-score) chunk; invalid slots carry index 0.
    ``noise`` (same shape as scores, e.g. Gumbel) perturbs the choice only, never the weights.
    """
    K = min(top_k, scores.shape[-1])
    ranked = scores if noise is None else scores + noise
    top = torch.topk(ranked, K, dim=-1).indices  # sorted by score: visible (finite) scores come first
    valid = torch.isfinite(torch.gather(scores, -1, top))
    top = torch.where(valid, top, torch.full_like(top, -1))
    top = torch.sort(top, dim=-1, descending=True).values  # most recent first, invalid (-1) last
    valid = top >= 0
    return top.clamp_min(0), valid


def fusion_weights(
    scores: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    rule: str = "softmax",
    recency: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights (B, T, Hkv, K) from the clean scores of the selected chunks; see ``weights_from_selected``."""
    return weights_from_selected(torch.gather(scores, -1, indices), valid, rule, recency)


def weights_from_selected(
    s: torch.Tensor, valid: torch.Tensor, rule: str = "softmax", recency: torch.Tensor | None = None
) -> torch.Tensor:
    """Fusion weights from the selected scores ``s`` (B, T, Hkv, K), slots most recent first; 0 on invalid slots.

    ``softmax`` (the paper): softmax over the selected scores. ``stick_breaking`` (RAMba):
    w_k = sigmoid(s_k) * prod_{j<k} (1 - sigmoid(s_j)) in recency order. ``joint``: the slot mask;
    attention then takes one softmax over the union. ``joint_scored``: the softmax weights, which that
    union softmax adds (as logs) to each chunk's logits. ``softmax_and_union``: the softmax weights, used
    both ways. ``recency`` (a scalar tensor) adds slot_rank * recency to the selected scores. Gradients
    reach the scores, hence q_slc and the landmarks, only through here.
    """
    if rule == "joint":
        return valid.to(torch.float32)
    if recency is not None:
        rank = torch.arange(s.shape[-1], device=s.device, dtype=s.dtype)
        s = s + rank * recency.to(s.dtype)
    if rule in ("softmax", "joint_scored", "softmax_and_union"):
        m = torch.where(valid, s, torch.full_like(s, float("-inf"))).amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        e = torch.exp(torch.where(valid, s, m) - m) * valid
        w = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    elif rule == "stick_breaking":
        s = torch.where(valid, s, torch.zeros_like(s))
        remaining = torch.cumsum(F.logsigmoid(-s) * valid, dim=-1) - F.logsigmoid(-s) * valid
        w = torch.exp(F.logsigmoid(s) + remaining) * valid
    else:
        raise ValueError(f"fusion rule {rule!r} is not one of softmax, stick_breaking, joint, joint_scored, "
                         f"softmax_and_union")
    return w if w.dtype == torch.float64 else w.to(torch.float32)


def with_successors(indices: torch.Tensor, weights: torch.Tensor, chunk_size: int,
                    query_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each selected chunk c also brings chunk c + 1 when that one is visible too (not the paper's; config
    ``read_successor``): (B, T, Hkv, 2K) indices and weights, the K selected slots then their successors,
    c's weight split evenly between c and c + 1 (kept whole when c + 1 is not visible, so every row's
    weights still sum as before). A successor that was selected itself appears twice: both fusions add
    duplicate slots' weights. Document masking needs nothing more: c + 1 starts after c."""
    t = torch.arange(query_start, query_start + indices.shape[1], device=indices.device)[None, :, None, None]
    nxt = indices + 1
    ok = ((nxt + 1) * chunk_size <= t) & (weights > 0)
    half = weights * 0.5
    return (torch.cat([indices, torch.where(ok, nxt, indices)], dim=-1),
            torch.cat([torch.where(ok, half, weights), torch.where(ok, half, torch.zeros_like(weights))], dim=-1))
