"""The model's dimensions and HSA options; validated on construction with readable errors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from hsa_lightning.errors import ConfigError

# How each token combines the chunks it picked (ModelConfig.fusion); attention_backend.FUSIONS is this list
Fusion = Literal["softmax", "stick_breaking", "joint", "joint_scored", "softmax_and_union"]


@dataclass
class ModelConfig:
    """Dimensions and settled HSA-UltraLong semantics; the alternatives are ablation options."""

    vocab_size: int = 512
    """Embedding rows; must cover the tokenizer's vocabulary."""
    d_model: int = 256
    n_layers: int = 8
    """Number of blocks; the layout plugin decides which kind each one is."""
    n_heads: int = 8
    """Query heads of every attention (SWA, full, HSA)."""
    n_kv_heads: int = 2
    """Key/value heads of SWA and full attention (GQA)."""
    hsa_kv_heads: int = 1
    """Key/value heads of the shared chunk memory; also the number of retrieval heads."""
    head_dim: Optional[int] = None
    """Per-head width; default d_model // n_heads."""
    chunk_size: int = 64
    """Tokens per chunk S; a power of two."""
    top_k: int = 8
    """Chunks each token retrieves per HSA KV head (clipped to the visible count)."""
    window: int = 512
    """SWA window in keys, the token itself included."""
    hsa_window: Optional[int] = None
    """SWA window inside HSA blocks; default ``window``."""
    retrieval_dim: Optional[int] = None
    """Total width of the retrieval query/landmark over all retrieval heads; default d_model."""
    landmark: Literal["encoder", "mean", "mean_shifted"] = "encoder"
    """``encoder``: bidirectional layer + CLS per chunk. ``mean``: mean-pooled chunk (ablation).
    ``mean_shifted`` (not the paper's): the mean of the tokens one position earlier, so each chunk is
    summarised by the tokens whose successors it holds and a query copying the token after its own finds
    that chunk, also where the successor starts a new chunk."""
    fusion: Fusion = "softmax"
    """How the selected chunks' outputs are combined (softmax over the selected scores is the paper's;
    ``joint``: one softmax over the union of their keys, as MoBA; ``joint_scored``: the same with each
    chunk's retrieval score added to its keys' logits, so retrieval still learns; ``softmax_and_union``:
    the mean of the ``softmax`` and ``joint_scored`` outputs over the same picks; none is the paper's)."""
    read_successor: bool = False
    """Not the paper's: each selected chunk also brings the chunk after it (when visible), the weight split
    between the two, so a copy whose next token starts a new chunk can reach it. Doubles HSA's work."""
    gumbel_noise: bool = False
    """Add Gumbel noise to the scores used for selection (training only; never to the weights)."""
    recency_bias: bool = False
    """Learnable bias slot_rank * theta on the selected scores (slots ordered most recent first)."""
    position_in_hsa: bool = False
    """Ablation: the position plugin also rotates HSA queries and the memory's keys at their absolute
    positions (the paper's HSA is NoPE, which is what lets it read chunks far past the training length)."""
    hsa_residual: Literal["bypass", "standard"] = "bypass"
    """``bypass``: the HSA output reaches the stream only through the MLP input (the paper's)."""
    qk_norm: bool = True
    """Per-head RMSNorm on queries and keys of every attention."""
    norm_eps: float = 1e-6
    init_std: float = 0.02
    loss_chunk_tokens: int = 2048
    """Tokens per slice of the chunked cross-entropy (logits are never built for all tokens at once)."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "hsa_kv_heads",
                    "chunk_size", "loss_chunk_tokens")
        for name in positive:
            _require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        _require(self.top_k >= 1, f"top_k={self.top_k} must be >= 1")
        _require(self.window >= 1, f"window={self.window} must be >= 1")
        if self.hsa_window is not None:
            _require(self.hsa_window >= 1, f"hsa_window={self.hsa_window} must be >= 1")
        _require(self.chunk_size & (self.chunk_size - 1) == 0,
                 f"chunk_size={self.chunk_size} is not a power of two")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        _require(self.n_heads % self.hsa_kv_heads == 0,
                 f"n_heads={self.n_heads} is not divisible by hsa_kv_heads={self.hsa_kv_heads}")
        if self.head_dim is None:
            _require(self.d_model % self.n_heads == 0,
                     f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        else:
            _require(self.head_dim >= 1 and self.head_dim % 2 == 0,
                     f"head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs)")
        _require(self.resolved_head_dim % 2 == 0,
                 f"head_dim={self.resolved_head_dim} (d_model / n_heads) must be even (RoPE rotates pairs)")
        _require(self.resolved_retrieval_dim % self.hsa_kv_heads == 0,
                 f"retrieval_dim={self.resolved_retrieval_dim} is not divisible by hsa_kv_heads={self.hsa_kv_heads}")
        _require(self.init_std > 0, f"init_std={self.init_std} must be > 0")
        _require(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be > 0")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_hsa_window(self) -> int:
        return self.hsa_window if self.hsa_window is not None else self.window

    @property
    def resolved_retrieval_dim(self) -> int:
        return self.retrieval_dim if self.retrieval_dim is not None else self.d_model


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
