"""The retrieval layer in front of each HSA block: which chunks every token reads, and their weights."""
from __future__ import annotations

import torch
from torch import nn

from hsa_lightning.kernels.retrieval import weights_from_selected, with_successors
from hsa_lightning.model.attention_backend import AttentionBackend, Selection, with_doc_start, with_query_start
from hsa_lightning.model.config import ModelConfig
from hsa_lightning.model.layers import Linear, RMSNorm


class Retrieval(nn.Module):
    """q_slc = W norm(x) per retrieval head (= HSA KV head); top-k over visible landmarks; fusion weights."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.backend = backend
        self.heads = cfg.hsa_kv_heads
        self.top_k: int | None = cfg.top_k  # None: every visible chunk (a curriculum's dense warm-up)
        self.chunk_size = cfg.chunk_size
        self.fusion, self.gumbel_noise, self.read_successor = cfg.fusion, cfg.gumbel_noise, cfg.read_successor
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = Linear(cfg.d_model, cfg.resolved_retrieval_dim, cfg.init_std)
        # Learnable recency bias theta (init 0): slot j of the recency-sorted list gets + j * theta.
        self.recency = nn.Parameter(torch.zeros(())) if cfg.recency_bias else None

    def reset_parameters(self) -> None:
        if self.recency is not None:
            nn.init.zeros_(self.recency)

    def forward(self, x: torch.Tensor, landmarks: torch.Tensor, doc_start: torch.Tensor | None = None,
                query_start: int = 0) -> Selection:
        """Rows of ``x`` sit at positions ``query_start``.. (nonzero only in incremental inference)."""
        B, T, _ = x.shape
        q = self.proj(self.norm(x)).view(B, T, self.heads, -1)
        gumbel = self.gumbel_noise and self.training
        top_k = landmarks.shape[1] if self.top_k is None else self.top_k
        indices, valid, selected = self.backend.select(q, landmarks, top_k, self.chunk_size, gumbel,
                                                       **with_doc_start(doc_start), **with_query_start(query_start))
        weights = weights_from_selected(selected, valid, self.fusion, self.recency)
        if self.read_successor:
            indices, weights = with_successors(indices, weights, self.chunk_size, query_start)
        read = {"joint": "union", "joint_scored": "union", "softmax_and_union": "both"}.get(self.fusion, "chunks")
        return Selection(indices=indices, weights=weights, read=read)
