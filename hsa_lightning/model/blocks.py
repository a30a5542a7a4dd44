"""The two kinds of decoder block: a plain attention block and the HSA block."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hsa_lightning.model.attention import SelfAttention
from hsa_lightning.model.attention_backend import AttentionBackend, ChunkMemory, with_doc_start, with_query_start
from hsa_lightning.model.cache import LayerCache
from hsa_lightning.model.config import ModelConfig
from hsa_lightning.model.ffn import FFN
from hsa_lightning.model.layers import Linear, Recomputable, RMSNorm
from hsa_lightning.model.position import PositionEncoding
from hsa_lightning.model.retrieval import Retrieval


def _out_std(cfg: ModelConfig) -> float:
    return cfg.init_std / (2 * cfg.n_layers) ** 0.5  # GPT-2 style: projections into the stream


class Block(Recomputable):
    """x + Attn(norm(x)), then + FFN(norm(.)); sliding-window (``window``) or full (None) causal attention."""

    def __init__(self, cfg: ModelConfig, window: Optional[int], position: PositionEncoding,
                 backend: AttentionBackend, ffn: FFN, layer_index: int):
        super().__init__()
        d = cfg.d_model
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = SelfAttention(d, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, window, position,
                                  backend, cfg.qk_norm, cfg.init_std, _out_std(cfg), cfg.norm_eps)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = ffn.build(d, layer_index, cfg.init_std, _out_std(cfg))

    def compute(self, x: torch.Tensor, positions: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                cache: Optional[LayerCache] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, doc_start, cache)
        return x + self.mlp(self.mlp_norm(x))


class HSABlock(Recomputable):
    """The HSA layer (paper section 3.1, code semantics):

        sel = Retrieval(x)                          (from the layer's input)
        x1  = x + SWA(norm(x))                      (RoPE, window ``hsa_window``)
        a   = o_proj(HSA(q_norm(q_proj(norm(x1))), memory, sel))   (NoPE; ``position_in_hsa``: rotated)
        y   = x1 + MLP(norm(x1 + a))                (bypass; ``standard``: (x1 + a) + MLP(norm(x1 + a)))
    """

    def __init__(self, cfg: ModelConfig, position: PositionEncoding, backend: AttentionBackend,
                 ffn: FFN, layer_index: int):
        super().__init__()
        d, H, D = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        self.n_heads, self.head_dim, self.bypass = H, D, cfg.hsa_residual == "bypass"
        self.backend = backend
        self.retrieval = Retrieval(cfg, backend)
        self.swa_norm = RMSNorm(d, cfg.norm_eps)
        self.swa = SelfAttention(d, H, cfg.n_kv_heads, D, cfg.resolved_hsa_window, position, backend,
                                 cfg.qk_norm, cfg.init_std, _out_std(cfg), cfg.norm_eps)
        self.hsa_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = Linear(d, H * D, cfg.init_std)
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.o_proj = Linear(H * D, d, _out_std(cfg))
        self.position = position if cfg.position_in_hsa else None
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.mlp = ffn.build(d, layer_index, cfg.init_std, _out_std(cfg))

    def compute(self, x: torch.Tensor, positions: torch.Tensor, memory: ChunkMemory,
                doc_start: Optional[torch.Tensor] = None, cache: Optional[LayerCache] = None) -> torch.Tensor:
        """``cache`` (inference): the internal SWA's cache; its position is where these queries start."""
        B, T, _ = x.shape
        query_start = 0 if cache is None else cache.position
        selection = None
        if self.backend.needs_retrieval:
            selection = self.retrieval(x, memory.landmarks, doc_start, query_start)
            memory, selection = memory.resident(selection)
        x1 = x + self.swa(self.swa_norm(x), positions, doc_start, cache)
        q = self.q_norm(self.q_proj(self.hsa_norm(x1)).view(B, T, self.n_heads, self.head_dim))
        if self.position is not None:
            q = self.position.rotate(q, positions)
        o = self.backend.memory_attention(q, memory, selection, **with_doc_start(doc_start),
                                          **with_query_start(query_start))
        a = self.o_proj(o.reshape(B, T, -1))
        if self.bypass:
            return x1 + self.mlp(self.mlp_norm(x1 + a))
        h = x1 + a
        return h + self.mlp(self.mlp_norm(h))
