"""Flash: the full-attention baseline on the same model.

HSA blocks attend densely to every visible chunk of the shared memory instead of a sparse top-k
(retrieval is skipped; its parameters stay, so checkpoints swap between backends). "Causal" over the
memory means chunk-causal: key j is visible to token t iff j < S * floor(t / S). A plain token-causal
mask would leak the future, because the chunk encoder is bidirectional inside a chunk. SWA and full
blocks use FlashAttention's kernels where the ``flash_attn`` package is installed, else
``scaled_dot_product_attention`` preferring the cuDNN and flash backends on GPU. With document masking
a token reads only the chunks that start inside its document.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from hsa_lightning.model.attention_backend import AttentionBackend, ChunkMemory, Selection, prefer_fused_sdpa

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


class Flash(AttentionBackend):
    needs_retrieval = False
    masks_documents = True
    incremental = True

    def local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        window: Optional[int], doc_start: Optional[torch.Tensor] = None) -> torch.Tensor:
        if doc_start is None and _HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func

            # flash_attn's window (left, right) counts keys beside the query; ours counts the query too.
            left = -1 if window is None else window - 1
            return flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
        with prefer_fused_sdpa(q):
            return super().local_attention(q, k, v, window, doc_start)

    def memory_attention(self, q: torch.Tensor, memory: ChunkMemory, selection: Optional[Selection],
                         doc_start: Optional[torch.Tensor] = None, query_start: int = 0) -> torch.Tensor:
        T, Lm, S = q.shape[1], memory.k.shape[1], memory.chunk_size
        t = torch.arange(query_start, query_start + T, device=q.device)
        j = torch.arange(Lm, device=q.device)
        visible_until = (t // S) * S  # keys [0, visible_until) are complete past chunks
        mask = j[None, :] < visible_until[:, None]  # (T, Lm)
        if doc_start is not None:  # (B, T, Lm): and only chunks that start inside the document
            mask = mask[None] & (j[None, None, :] >= (-(-doc_start // S) * S)[:, :, None])
        seen = mask.any(-1)  # rows with nothing visible read key 0 and are zeroed below
        mask[..., 0] |= ~seen
        mask = mask if doc_start is None else mask[:, None]
        qh, kh, vh = q.transpose(1, 2), memory.k.transpose(1, 2), memory.v.transpose(1, 2)
        with prefer_fused_sdpa(q):
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                                 enable_gqa=qh.shape[1] != kh.shape[1])
        seen = seen[None] if doc_start is None else seen
        return out.transpose(1, 2) * seen[:, :, None, None].to(out.dtype)
