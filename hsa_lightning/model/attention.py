"""Multi-head self-attention with GQA, QK-norm and a position plugin; the backend computes it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hsa_lightning.model.attention_backend import AttentionBackend, with_doc_start
from hsa_lightning.model.cache import LayerCache
from hsa_lightning.model.layers import Linear, RMSNorm
from hsa_lightning.model.position import PositionEncoding


class SelfAttention(nn.Module):
    """Causal attention over the last ``window`` keys (None: all past keys), or bidirectional."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        window: Optional[int],
        position: PositionEncoding,
        backend: AttentionBackend,
        qk_norm: bool,
        std: float,
        out_std: float,
        eps: float,
        causal: bool = True,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.causal = window, causal
        self.configured_window = window  # what a curriculum restores
        self.position, self.backend = position, backend
        self.q_proj = Linear(d_model, n_heads * head_dim, std)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, std)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, std)
        self.o_proj = Linear(n_heads * head_dim, d_model, out_std)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                cache: Optional[LayerCache] = None) -> torch.Tensor:
        """``cache`` (inference): the keys and values of earlier tokens, which this call reads and extends."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = self.position.rotate(q, positions), self.position.rotate(k, positions)
        if cache is not None:
            o = cache.attend(q, k, v, self.backend)
        elif self.causal:
            o = self.backend.local_attention(q, k, v, self.window, **with_doc_start(doc_start))
        else:  # the chunk encoder: a handful of tokens, every one sees every other
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                enable_gqa=self.n_heads != self.n_kv_heads,
            ).transpose(1, 2)
        return self.o_proj(o.reshape(B, T, -1))
