"""Per-layer key/value caches for incremental inference (``hsa_lightning/inference`` drives them).

A cache belongs to one causal attention and holds the keys and values (after RoPE) of the tokens it
has already seen; ``attend`` reads them with the new queries and appends the new keys. Queries of a
call sit at positions ``position ..``, so a prompt can be fed in segments and then one token at a time
with the result of one full forward.

  ``WindowCache``  sliding-window attention: only the last ``window - 1`` keys, a fixed size
  ``FullCache``    full attention (Dense layouts): every key, preallocated for ``capacity`` tokens
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from hsa_lightning.errors import InferenceError


class LayerCache:
    def __init__(self, position: int = 0):
        self.position = position  # absolute position of the next token this layer sees

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend) -> torch.Tensor:
        """Causal attention of q (B, T, H, D) over the cached keys and k, v (B, T, Hkv, D); appends k, v."""
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


def _attend_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query row per sequence that sees every key given: no mask needed (decode)."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=qh.shape[1] != kh.shape[1]).transpose(1, 2)


class WindowCache(LayerCache):
    """The last ``window - 1`` keys and values (with the new token, the whole window), rounded up to a
    multiple of 128 so that cached + new keys keep the lengths the sliding-window kernels are built for
    (a 16,384-token segment after 512 cached keys is 16,896 = 132 x 128); keys past the window are
    masked by the window rule."""

    def __init__(self, window: int, position: int = 0):
        super().__init__(position)
        self.window = window
        self.keep = -(-(window - 1) // 128) * 128
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def attend(self, q, k, v, backend):
        T = q.shape[1]
        if self.k is not None:
            k, v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        n_cached = k.shape[1] - T
        if T == 1:
            o = _attend_all(q, k[:, -self.window:], v[:, -self.window:])
        else:
            # The backend's (fast) sliding-window kernel over cached + new keys, with placeholder
            # queries in front for the cached positions whose outputs are dropped: exact, since the
            # window mask only depends on the distance between query and key.
            q_all = torch.cat([q.new_zeros(q.shape[0], n_cached, *q.shape[2:]), q], 1) if n_cached else q
            o = backend.local_attention(q_all, k, v, self.window)[:, n_cached:]
        keep = self.keep
        self.k, self.v = (k[:, -keep:].clone(), v[:, -keep:].clone()) if keep else (None, None)
        self.position += T
        return o

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


class FullCache(LayerCache):
    """Every key and value so far, in buffers allocated for ``capacity`` tokens on the first call."""

    def __init__(self, capacity: int, position: int = 0):
        super().__init__(position)
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def attend(self, q, k, v, backend):
        B, T = q.shape[:2]
        start, end = self.position, self.position + T
        if end > self.capacity:
            raise InferenceError(f"full-attention cache holds {self.capacity} tokens; position {end} is past it")
        if self.k is None:
            self.k = k.new_empty(B, self.capacity, *k.shape[2:])
            self.v = v.new_empty(B, self.capacity, *v.shape[2:])
        self.k[:, start:end], self.v[:, start:end] = k, v
        self.position = end
        if start == 0:
            return backend.local_attention(q, k, v, None)
        if T == 1:
            return _attend_all(q, self.k[:, :end], self.v[:, :end])
        qh, kh, vh = q.transpose(1, 2), self.k[:, :end].transpose(1, 2), self.v[:, :end].transpose(1, 2)
        # causal with the queries aligned to the last keys, without building a (T, end) mask
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(T, end),
                                           enable_gqa=qh.shape[1] != kh.shape[1])
        return o.transpose(1, 2)

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()
