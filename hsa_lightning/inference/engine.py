"""Exact incremental inference for HSALM: segmented prefill, decode, suffix-only scoring, generation.

The cache is one shared chunk memory (``ChunkStore``: K, V and landmarks of every completed chunk) plus
one key/value cache per causal attention: a ``WindowCache`` of W - 1 tokens for sliding-window layers
(fixed size) and a ``FullCache`` only for full-attention layers (Dense layouts). So with the paper's
layout, memory grows with context only through the chunk memory.

The model splits at the chunk encoder into a lower decoder, whose output builds the memory, and an
upper decoder, which reads it. When every upper attention is windowed, an upper-layer state at
position t depends only on the memory and on the lower decoder's output at t - R .. t, where R is the
sum of the upper windows (minus one each). So logits for the last n tokens of a long prompt are exact
when the lower decoder and the encoder run over everything and the upper decoder only over the last
n + R tokens ("suffix-only"); ``prefill(..., last=n)`` does exactly that. Tests check every path
against one full forward.
"""
from __future__ import annotations

import os
import sys
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from hsa_lightning.errors import InferenceError
from hsa_lightning.inference.memory import ChunkStore
from hsa_lightning.inference.sampling import sample_next
from hsa_lightning.model.attention import SelfAttention
from hsa_lightning.model.blocks import Block, HSABlock
from hsa_lightning.model.cache import FullCache, LayerCache, WindowCache
from hsa_lightning.model.hsalm import HSALM

GiB = 2**30


def _causal_attention(block: Block | HSABlock) -> SelfAttention:
    return block.swa if isinstance(block, HSABlock) else block.attn


class InferenceEngine:
    """Serves one batch of ``batch_size`` equally long sequences of up to ``max_tokens`` tokens.

    ``segment_len`` tokens go through the model at a time while a prompt is read; ``offload`` keeps
    the chunk K/V in pinned host memory; ``memory_budget_gib`` caps the cache (default: the device's
    free memory). The model is put in eval mode. ``reset()`` starts a new batch.
    """

    def __init__(self, model: HSALM, max_tokens: int, batch_size: int = 1, segment_len: int = 16384,
                 offload: bool = False, memory_budget_gib: float | None = None, progress: bool | None = None):
        backend = type(model.backend).__name__
        if not model.backend.incremental:
            raise InferenceError(f"attention backend {backend} does not support incremental inference (its select "
                                 "and memory_attention take no query_start); use HSATriton, HSAReference or Flash")
        if offload and not model.backend.needs_retrieval:
            raise InferenceError(f"offload=True needs a backend that selects chunks; {backend} attends to every "
                                 "chunk of the memory, so its K/V must stay on the device")
        for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size), ("segment_len", segment_len)):
            if value < 1:
                raise InferenceError(f"{name}={value} must be >= 1")
        self.model = model.eval()
        self.max_tokens, self.batch_size, self.segment_len = max_tokens, batch_size, segment_len
        self.offload, self.progress = offload, progress
        weight = model.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.split = model.encoder_at if model.encoder is not None else 0
        upper = [_causal_attention(b) for b in model.blocks[self.split:]]
        # suffix-only scoring needs every upper attention windowed; R is how far back an upper state reads
        self.suffix_ok = all(a.window is not None for a in upper)
        self.receptive = sum(a.window - 1 for a in upper) if self.suffix_ok else None
        self._check_budget(memory_budget_gib)
        self.reset()

    # -- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every token: the next call starts a new batch of sequences at position 0."""
        cfg = self.model.config
        self.position = 0  # tokens the lower decoder has read
        self.lower_caches = self._new_caches(self.model.blocks[:self.split], 0)
        self.upper_caches = self._new_caches(self.model.blocks[self.split:], 0)
        self.store = None
        if self.model.encoder is not None:
            self.store = ChunkStore(self.batch_size, self._capacity_chunks(), cfg.chunk_size, cfg.hsa_kv_heads,
                                    cfg.resolved_head_dim, cfg.resolved_retrieval_dim, self.device, self.dtype,
                                    self.offload)
        self.pending: torch.Tensor | None = None  # lower-decoder output of the incomplete last chunk
        self.before: torch.Tensor | None = None  # ... of the last stored chunk's last token (landmark mean_shifted)

    def _new_caches(self, blocks, position: int) -> list[LayerCache]:
        caches = []
        for block in blocks:
            window = _causal_attention(block).window
            caches.append(FullCache(self.max_tokens, position) if window is None else WindowCache(window, position))
        return caches

    def _capacity_chunks(self) -> int:
        return -(-self.max_tokens // self.model.config.chunk_size)

    def cache_bytes(self) -> dict[str, int]:
        """Bytes the cache allocates for ``max_tokens``: chunk K/V, landmarks, full-attention K/V."""
        cfg, el = self.model.config, self.dtype.itemsize
        kv = lmk = 0
        if self.model.encoder is not None:
            kv, lmk = ChunkStore.nbytes(self.batch_size, self._capacity_chunks(), cfg.chunk_size, cfg.hsa_kv_heads,
                                        cfg.resolved_head_dim, cfg.resolved_retrieval_dim, el)
        full_layers = sum(_causal_attention(b).window is None for b in self.model.blocks)
        full = 2 * full_layers * self.batch_size * self.max_tokens * cfg.n_kv_heads * cfg.resolved_head_dim * el
        return {"chunk_kv": kv, "landmarks": lmk, "full_attention_kv": full}

    def _check_budget(self, budget_gib: float | None) -> None:
        sizes = self.cache_bytes()
        on_device = sizes["landmarks"] + sizes["full_attention_kv"] + (0 if self.offload else sizes["chunk_kv"])
        detail = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in sizes.items())
        if budget_gib is not None:
            budget, source = budget_gib * GiB, f"memory_budget_gib={budget_gib}"
        elif self.device.type == "cuda":
            budget, source = torch.cuda.mem_get_info(self.device)[0], f"free memory on {self.device}"
        else:
            budget, source = _available_host_bytes(), "available host memory"
        if on_device > budget:
            hint = (f"; offload=True moves the chunk K/V ({sizes['chunk_kv'] / GiB:.2f} GiB) to host memory"
                    if not self.offload and self.model.backend.needs_retrieval and sizes["chunk_kv"] else "")
            raise InferenceError(
                f"a cache for max_tokens={self.max_tokens} (batch {self.batch_size}) needs {on_device / GiB:.2f} GiB "
                f"on {self.device} ({detail}) but {source} is {budget / GiB:.2f} GiB{hint}")
        if self.offload and sizes["chunk_kv"] > _available_host_bytes():
            raise InferenceError(
                f"offloading the chunk K/V for max_tokens={self.max_tokens} needs {sizes['chunk_kv'] / GiB:.2f} GiB "
                f"of host memory; {_available_host_bytes() / GiB:.2f} GiB are available")

    # -- the two halves of the model -------------------------------------------------------------
    def _lower(self, ids: torch.Tensor) -> torch.Tensor:
        """Embed + lower decoder for the next tokens; completed chunks go into the memory."""
        T = ids.shape[1]
        positions = torch.arange(self.position, self.position + T, device=self.device)
        x = self.model.embed(ids)
        for block, cache in zip(self.model.blocks[:self.split], self.lower_caches):
            x = block(x, positions, cache=cache)
        if self.store is not None:
            h = x if self.pending is None else torch.cat([self.pending, x], 1)
            complete = h.shape[1] // self.store.chunk_size * self.store.chunk_size
            if complete:  # h starts where the pending (incomplete-chunk) tokens do
                self.store.append(self.model.encoder(h[:, :complete], self.position + T - h.shape[1], self.before))
                self.before = h[:, complete - 1:complete].clone()
            self.pending = h[:, complete:].clone()
        self.position += T
        return x

    def _upper(self, x: torch.Tensor) -> torch.Tensor:
        """Upper decoder + final norm for lower-decoder outputs at the upper caches' next positions."""
        start = self.upper_caches[0].position if self.upper_caches else self.position - x.shape[1]
        positions = torch.arange(start, start + x.shape[1], device=self.device)
        memory = self.store.view() if self.store is not None else None
        for block, cache in zip(self.model.blocks[self.split:], self.upper_caches):
            x = block(x, positions, memory, cache=cache) if isinstance(block, HSABlock) else block(x, positions, cache=cache)
        return self.model.norm(x)

    def _hidden(self, ids: torch.Tensor, last: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """Feed ``ids`` (B, N); yield (position, final hidden states) pieces covering exactly the last
        ``last`` (None: all) of these N positions, in order."""
        B, N = ids.shape
        if B != self.batch_size:
            raise InferenceError(f"input has batch {B} but the engine was built for batch_size={self.batch_size}")
        if self.position + N > self.max_tokens:
            raise InferenceError(f"{N} more tokens after position {self.position} exceed max_tokens={self.max_tokens}; "
                                 "build the engine with a larger max_tokens")
        start = self.position
        wanted = start + N - (N if last is None else min(last, N))  # first position whose output is needed
        upper_from = self.upper_caches[0].position if self.upper_caches else start
        if self.suffix_ok and wanted - self.receptive > upper_from:
            # skip the upper decoder where no wanted output depends on it
            upper_from = wanted - self.receptive
            self.upper_caches = self._new_caches(self.model.blocks[self.split:], upper_from)
        bar = self._progress_bar(N)
        for s in range(0, N, self.segment_len):
            seg = ids[:, s:s + self.segment_len].to(self.device)
            x = self._lower(seg)
            seg_start = start + s
            if seg_start + seg.shape[1] > upper_from:
                skip = max(upper_from - seg_start, 0)
                h = self._upper(x[:, skip:])
                keep = max(wanted - (seg_start + skip), 0)
                if keep < h.shape[1]:
                    yield seg_start + skip + keep, h[:, keep:]
            if bar is not None:
                bar.update(seg.shape[1])
        if bar is not None:
            bar.close()

    def _progress_bar(self, n: int):
        show = self.progress if self.progress is not None else n > 4 * self.segment_len
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(total=n, unit="tok", unit_scale=True, desc="prefill", file=sys.stderr)

    # -- public API ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, last: int | None = 1) -> torch.Tensor:
        """Read ``input_ids`` (B, N) after whatever the cache holds; logits (B, n, V) of the last
        ``last`` of these positions (None: all N, which at long lengths needs a lot of memory)."""
        pieces = [self.model.head(h) for _, h in self._hidden(input_ids, last)]
        return torch.cat(pieces, 1)

    @torch.inference_mode()
    def token_nll(self, input_ids: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Read ``input_ids`` (B, N); float32 NLL (B, n) of the last ``last`` (None: all N - 1) tokens
        predicted from the tokens before them in this call, one segment of logits at a time."""
        N, base = input_ids.shape[1], self.position
        n = N - 1 if last is None else min(last, N - 1)
        out = []
        for pos, h in self._hidden(input_ids, n + 1):
            row = pos - base  # index of this piece's first position within input_ids
            h = h[:, : N - 1 - row]  # the final position predicts a token we do not have
            if h.shape[1]:
                targets = input_ids[:, row + 1: row + 1 + h.shape[1]].to(self.device)
                logits = self.model.head(h).float()
                out.append(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))
        return torch.cat(out, 1) if out else torch.zeros(input_ids.shape[0], 0, device=self.device)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode one token per sequence (B,): logits (B, V) for the next one."""
        return self.prefill(tokens.view(-1, 1), last=1)[:, 0]

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_tokens: Sequence[int] = (), seed: int | None = None) -> list[list[int]]:
        """Continue ``prompt`` (B, N) from an empty cache: greedy when ``temperature`` is 0, else sampling
        with nucleus ``top_p``. Each row stops after ``max_new_tokens`` or at a stop token (not included)."""
        if max_new_tokens < 1:
            raise InferenceError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if prompt.shape[1] + max_new_tokens > self.max_tokens:
            raise InferenceError(f"a prompt of {prompt.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds "
                                 f"max_tokens={self.max_tokens}")
        self.reset()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stops = torch.tensor(list(stop_tokens), device=self.device, dtype=torch.long)
        logits = self.prefill(prompt, last=1)[:, 0]
        done = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        out = []
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, generator)
            done = done | torch.isin(token, stops)
            out.append(torch.where(done, -1, token))
            # checking for "all rows stopped" costs a host sync, so only every 16 tokens
            if i == max_new_tokens - 1 or (i % 16 == 15 and bool(done.all())):
                break
            logits = self.step(token)
        rows = torch.stack(out, 1).tolist()
        return [row[: row.index(-1)] if -1 in row else row for row in rows]


def _available_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62
