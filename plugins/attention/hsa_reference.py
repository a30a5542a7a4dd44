"""HSAReference: the exact HSA operator in plain PyTorch (any device, any dtype, any head ratio)."""
from __future__ import annotations

import torch

from hsa_lightning.kernels.hsa import hsa_attention_reference, joint_chunk_attention_reference
from hsa_lightning.model.attention_backend import AttentionBackend, ChunkMemory, Selection


class HSAReference(AttentionBackend):
    """Sparse chunk attention through ``kernels/hsa/naive.py``: slow, exact, float64-capable."""

    aliases = ("reference",)
    masks_documents = True  # the default local attention and retrieval take doc_start
    incremental = True  # positions live in the selection, so query_start needs nothing here

    def memory_attention(self, q: torch.Tensor, memory: ChunkMemory, selection: Selection,
                         doc_start: torch.Tensor | None = None, query_start: int = 0) -> torch.Tensor:
        # documents are already respected: the selection holds no chunk of another document
        args = (q, memory.k, memory.v, selection.weights, selection.indices, memory.chunk_size)
        if selection.read == "chunks":
            return hsa_attention_reference(*args)
        if selection.read == "union":
            return joint_chunk_attention_reference(*args)
        return 0.5 * (hsa_attention_reference(*args) + joint_chunk_attention_reference(*args))
