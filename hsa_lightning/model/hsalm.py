"""HSALM: the HSA-UltraLong language model, assembled from a layout and plugins.

    embed -> blocks in layout order; at the ``encoder`` step the chunk encoder turns the current
    hidden state into the shared memory (K, V, landmarks) that every later HSA block reads
    -> final norm -> tied LM head -> cross-entropy a slice of tokens at a time
"""
from __future__ import annotations

import torch
from torch import nn

from hsa_lightning.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from hsa_lightning.model.attention import SelfAttention
from hsa_lightning.model.attention_backend import AttentionBackend
from hsa_lightning.model.blocks import Block, HSABlock
from hsa_lightning.model.chunk_encoder import ChunkEncoder
from hsa_lightning.model.config import ModelConfig
from hsa_lightning.model.ffn import FFN, RoutedFFN
from hsa_lightning.model.layers import Embedding, RMSNorm
from hsa_lightning.model.layout import ENCODER, HSA, SWA, LayerLayout, check_plan
from hsa_lightning.model.position import PositionEncoding
from hsa_lightning.model.retrieval import Retrieval


class HSALM(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend, layout: LayerLayout,
                 position: PositionEncoding, ffn: FFN):
        super().__init__()
        self.config = config
        self.backend = attention  # a stateless strategy object, not a module
        self.plan = check_plan(layout.plan(config.n_layers), config.n_layers, type(layout).__name__)
        self.embed = Embedding(config.vocab_size, config.d_model, config.init_std)
        self.blocks = nn.ModuleList()
        self.encoder: ChunkEncoder | None = None
        self.encoder_at = -1  # index of the first block that runs after the encoder
        for step in self.plan:
            i = len(self.blocks)
            if step == ENCODER:
                self.encoder, self.encoder_at = ChunkEncoder(config, position, attention, ffn), i
            elif step == HSA:
                self.blocks.append(HSABlock(config, position, attention, ffn, i))
            else:  # SWA or FULL (check_plan rejected anything else)
                window = config.window if step == SWA else None
                self.blocks.append(Block(config, window, position, attention, ffn, i))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # which blocks read the chunk memory, decided here: a sharding wrapper hides the block's class
        self.reads_memory = [isinstance(block, HSABlock) for block in self.blocks]

    def hidden_states(self, input_ids: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) final-normed hidden states; any T >= 1. ``doc_start`` (B, T), the
        first position of each token's document, keeps attention and retrieval inside documents."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids)
        memory = None
        for i, block in enumerate(self.blocks):
            if i == self.encoder_at:
                memory = self.encoder(x)
            x = block(x, positions, memory, doc_start) if self.reads_memory[i] else block(x, positions, doc_start)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V). For training use ``loss``, which never holds all logits at once."""
        return self.head(self.hidden_states(input_ids, doc_start))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states -> logits through the tied embedding."""
        return hidden @ self.embed.weight.t()

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
             doc_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token NLLs, number of scored tokens); ``labels`` -100 are not scored."""
        h = self.hidden_states(input_ids, doc_start)
        y = labels.reshape(-1)
        nll = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.embed.weight, y, self.config.loss_chunk_tokens)
        return nll, (y != IGNORE_INDEX).sum()

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or (``active``) those one token uses: routed experts it skips are left out."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            total -= sum(m.inactive_parameters() for m in self.routed_ffns())
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len`` (forward + backward = 3 x forward), for MFU: 6 x the
        active parameters (the tied embedding counted once, as the LM head) plus attention's
        score and value products, 4 x heads x head_dim per key a query reads: its window (mean over the
        sequence), the HSA blocks' top-k chunks, the chunk encoder's S + 1 tokens; plus retrieval's
        landmark scores over the visible chunks."""
        cfg, T = self.config, seq_len
        per_key = 4 * cfg.n_heads * cfg.resolved_head_dim
        attention = 0.0
        for m in self.modules():
            if isinstance(m, SelfAttention):
                if not m.causal:  # the chunk encoder: S tokens + CLS, bidirectional
                    attention += per_key * (cfg.chunk_size + 1)
                    continue
                w = T if m.window is None else min(m.window, T)
                attention += per_key * (w * (w + 1) / 2 + (T - w) * w) / T  # mean keys per query
            elif isinstance(m, Retrieval):  # one per HSA block
                visible = max(T // cfg.chunk_size - 1, 0) / 2  # mean visible chunks over the sequence
                if not self.backend.needs_retrieval:  # Flash: every visible chunk, densely
                    attention += per_key * visible * cfg.chunk_size
                    continue
                top_k = visible if m.top_k is None else min(m.top_k, visible)
                attention += per_key * top_k * cfg.chunk_size + 2 * cfg.resolved_retrieval_dim * visible
        return 6.0 * self.num_parameters(active=True) + 3.0 * attention

    def set_window(self, window: int | None) -> None:
        """Every sliding-window attention (SWA blocks and the HSA blocks' own SWA) now sees ``window``
        keys; None restores the configured windows."""
        for m in self.modules():
            if isinstance(m, SelfAttention) and m.causal and m.configured_window is not None:
                m.window = m.configured_window if window is None else window

    def set_top_k(self, top_k: int | str | None) -> None:
        """Chunks each token retrieves from now on: an int, ``"all"`` (every visible chunk) or None
        (the configured ``top_k``)."""
        for m in self.modules():
            if isinstance(m, Retrieval):
                m.top_k = self.config.top_k if top_k is None else None if top_k == "all" else top_k

    def units(self) -> list[nn.Module]:
        """The chunk encoder and the blocks: what activation checkpointing, compilation and sharding
        apply to one at a time."""
        return ([self.encoder] if self.encoder is not None else []) + list(self.blocks)

    def routed_ffns(self) -> list[RoutedFFN]:
        return [m for m in self.modules() if isinstance(m, RoutedFFN)]
