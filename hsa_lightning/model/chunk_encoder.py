"""The chunking layer: turns the mid-layer hidden state into the shared memory (K, V, landmarks).

Per chunk of S tokens, a bidirectional encoder layer runs over the chunk plus a learned CLS vector
appended at position S (RoPE over positions 0..S inside the chunk). K and V come from the encoded
tokens, the landmark from the CLS output. Option ``landmark="mean"``: no encoder, the landmark is the
mean of the normalised chunk; ``"mean_shifted"``: the mean of the normalised tokens one position earlier
(positions cS-1 .. cS+S-2 for chunk c; ``before`` is the hidden state just before ``h``, zeros at the
sequence's start), so the landmark covers the tokens whose successors the chunk holds. With
``position_in_hsa`` the keys are also rotated at their absolute positions ``start``.. (``start``: where
``h`` begins in the sequence). A sequence whose length is not a multiple of S is padded here; the padded
chunk is incomplete, so the visibility rule never lets a real token read it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hsa_lightning.model.attention import SelfAttention
from hsa_lightning.model.attention_backend import AttentionBackend, ChunkMemory
from hsa_lightning.model.config import ModelConfig
from hsa_lightning.model.ffn import FFN
from hsa_lightning.model.layers import Linear, Recomputable, RMSNorm
from hsa_lightning.model.position import PositionEncoding


class ChunkEncoder(Recomputable):
    def __init__(self, cfg: ModelConfig, position: PositionEncoding, backend: AttentionBackend, ffn: FFN):
        super().__init__()
        d, D, std = cfg.d_model, cfg.resolved_head_dim, cfg.init_std
        self.S, self.hkv, self.head_dim = cfg.chunk_size, cfg.hsa_kv_heads, D
        self.use_encoder = cfg.landmark == "encoder"
        self.shift_landmark = cfg.landmark == "mean_shifted"
        out_std = std / (2 * cfg.n_layers) ** 0.5
        if self.use_encoder:
            self.cls = nn.Parameter(torch.empty(d))
            self.attn_norm = RMSNorm(d, cfg.norm_eps)
            self.attn = SelfAttention(d, cfg.n_heads, cfg.n_kv_heads, D, None, position, backend,
                                      cfg.qk_norm, std, out_std, cfg.norm_eps, causal=False)
            self.mlp_norm = RMSNorm(d, cfg.norm_eps)
            self.mlp = ffn.build(d, -1, std, out_std)
        self.out_norm = RMSNorm(d, cfg.norm_eps)
        self.k_proj = Linear(d, cfg.hsa_kv_heads * D, std)
        self.v_proj = Linear(d, cfg.hsa_kv_heads * D, std)
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.landmark_proj = Linear(d, cfg.resolved_retrieval_dim, std)
        self.std = std
        self.position = position if cfg.position_in_hsa else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.use_encoder:
            nn.init.normal_(self.cls, std=self.std)

    def compute(self, h: torch.Tensor, start: int = 0, before: torch.Tensor | None = None) -> ChunkMemory:
        B, T, d = h.shape
        S = self.S
        C = -(-T // S)
        x = F.pad(h, (0, 0, 0, C * S - T)).reshape(B * C, S, d)
        if self.use_encoder:
            x = torch.cat([x, self.cls.to(x.dtype).expand(B * C, 1, d)], dim=1)
            positions = torch.arange(S + 1, device=h.device)
            x = x + self.attn(self.attn_norm(x), positions)
            x = self.out_norm(x + self.mlp(self.mlp_norm(x)))
            tokens, summary = x[:, :S], x[:, S]
        else:
            tokens = self.out_norm(x)
            pooled = tokens
            if self.shift_landmark:
                first = tokens.new_zeros(B, 1, d) if before is None else self.out_norm(before)
                pooled = torch.cat([first, tokens.view(B, C * S, d)[:, :-1]], 1).view(B * C, S, d)
            summary = pooled.mean(dim=1)
        k = self.k_norm(self.k_proj(tokens).view(B, C * S, self.hkv, self.head_dim))
        if self.position is not None:
            k = self.position.rotate(k, torch.arange(start, start + C * S, device=h.device))
        v = self.v_proj(tokens).view(B, C * S, self.hkv, self.head_dim)
        landmarks = self.landmark_proj(summary).view(B, C, self.hkv, -1)
        return ChunkMemory(k=k, v=v, landmarks=landmarks, chunk_size=S)
