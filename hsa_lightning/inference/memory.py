"""The shared chunk memory of an inference cache, on the device or with K/V offloaded to host memory.

The chunk encoder turns every completed 64-token chunk into its K, V and landmark; ``ChunkStore``
appends them to buffers sized for the whole context, so nothing is reallocated while a 16M-token
prompt streams through. With ``offload`` the K/V live in pinned host memory, chunk-major
(B, chunks, 2, S, Hkv, D) so each selected chunk is one contiguous block; the landmarks stay on the
device, where the exact retrieval scan reads all of them. ``OffloadedChunkMemory.resident`` then
copies just the chunks a segment selected to the device in one batched transfer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hsa_lightning.errors import InferenceError
from hsa_lightning.model.attention_backend import ChunkMemory, Selection


class ChunkStore:
    def __init__(self, batch: int, capacity_chunks: int, chunk_size: int, kv_heads: int, head_dim: int,
                 retrieval_dim: int, device: torch.device, dtype: torch.dtype, offload: bool = False):
        self.capacity, self.chunk_size, self.offload = capacity_chunks, chunk_size, offload
        self.device = device
        self.n_chunks = 0
        B, C, S = batch, max(capacity_chunks, 1), chunk_size
        self.landmarks = torch.empty(B, C, kv_heads, retrieval_dim // kv_heads, device=device, dtype=dtype)
        if offload:
            pin = torch.cuda.is_available()
            self.kv = torch.empty(B, C, 2, S, kv_heads, head_dim, dtype=dtype, pin_memory=pin)
            self.kv[:, 0].zero_()
        else:
            self.k = torch.empty(B, C * S, kv_heads, head_dim, device=device, dtype=dtype)
            self.v = torch.empty_like(self.k)
            self.k[:, :S].zero_(), self.v[:, :S].zero_()
        # Chunk 0 also stands in before any chunk is complete (and backs padding slots): never garbage.
        self.landmarks[:, 0].zero_()

    @staticmethod
    def nbytes(batch: int, capacity_chunks: int, chunk_size: int, kv_heads: int, head_dim: int,
               retrieval_dim: int, element_size: int) -> tuple[int, int]:
        """(K/V bytes, landmark bytes) a store of this size allocates."""
        kv = 2 * batch * capacity_chunks * chunk_size * kv_heads * head_dim * element_size
        return kv, batch * capacity_chunks * retrieval_dim * element_size

    def append(self, memory: ChunkMemory) -> None:
        """Store the complete chunks of ``memory`` (as the chunk encoder returns them) after the others."""
        n, S = memory.landmarks.shape[1], self.chunk_size
        first, last = self.n_chunks, self.n_chunks + n
        if last > self.capacity:
            raise InferenceError(f"the chunk memory holds {self.capacity} chunks ({self.capacity * S} tokens); "
                                 f"chunk {last} does not fit")
        self.landmarks[:, first:last] = memory.landmarks
        if self.offload:
            kv = torch.stack([memory.k.unflatten(1, (n, S)), memory.v.unflatten(1, (n, S))], 2)  # (B, n, 2, S, Hkv, D)
            self.kv[:, first:last].copy_(kv)
        else:
            self.k[:, first * S:last * S], self.v[:, first * S:last * S] = memory.k, memory.v
        self.n_chunks = last

    def view(self) -> ChunkMemory:
        """The complete chunks so far (at least one slot: before the first chunk completes, a zero
        chunk no token can see, as in the full forward whose padded chunk is never visible)."""
        n, S = max(self.n_chunks, 1), self.chunk_size
        if self.offload:
            return OffloadedChunkMemory(k=None, v=None, landmarks=self.landmarks[:, :n], chunk_size=S,
                                        kv=self.kv[:, :n], device=self.device)
        return ChunkMemory(k=self.k[:, :n * S], v=self.v[:, :n * S], landmarks=self.landmarks[:, :n], chunk_size=S)


@dataclass
class OffloadedChunkMemory(ChunkMemory):
    kv: torch.Tensor | None = None  # host (B, n_chunks, 2, S, Hkv, D)
    device: torch.device | None = None

    def resident(self, selection: Selection) -> tuple[ChunkMemory, Selection]:
        """The union of the selected chunks (over batch rows, tokens, heads and slots), copied to the
        device in one transfer, with the selection renumbered into it. The union's size is only known
        on the host, so this syncs once per call."""
        B, n = self.kv.shape[:2]
        rows = torch.arange(B, device=selection.indices.device).view(B, 1, 1, 1)
        flat = selection.indices + rows * n  # (batch row, chunk) as one id
        union = torch.unique(flat)
        on_host = union.cpu()
        block = self.kv[on_host // n, on_host % n]  # (U, 2, S, Hkv, D), gathered on the host
        if self.device.type == "cuda":
            block = block.pin_memory()
        block = block.to(self.device, non_blocking=True)
        U, _, S, H, D = block.shape
        k = block[:, 0].reshape(1, U * S, H, D).expand(B, -1, -1, -1)
        v = block[:, 1].reshape(1, U * S, H, D).expand(B, -1, -1, -1)
        indices = torch.searchsorted(union, flat.flatten()).view_as(flat)
        return (ChunkMemory(k=k, v=v, landmarks=self.landmarks, chunk_size=self.chunk_size),
                Selection(indices=indices, weights=selection.weights, read=selection.read))
