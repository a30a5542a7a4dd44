"""HSATriton: HSA through the Triton kernels of ``kernels/hsa/parallel.py`` and the fused retrieval of
``kernels/retrieval/parallel.py`` (the reference retrieval serves Gumbel noise and odd retrieval widths).

Drop-in for HSAReference (same model, same parameters, bf16-level agreement). Sliding-window layers use
FlexAttention with a sliding-window block mask on GPU for lengths that are multiples of 128 (exact,
block-sparse; compiled once per length) and banded SDPA for other lengths; full layers use
``scaled_dot_product_attention`` preferring cuDNN / flash. With document masking, local attention
and retrieval take the exact masked reference paths (slower: the fused kernels have no document
bound yet). On CPU it runs only under the Triton interpreter (``TRITON_INTERPRET=1``), which is how
CI checks it.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from hsa_lightning.errors import PluginError
from hsa_lightning.model.attention_backend import (AttentionBackend, ChunkMemory, Selection, banded_window_attention,
                                                   prefer_fused_sdpa)
from hsa_lightning.model.config import ModelConfig


MAX_FUSED_TOPK_X_WIDTH = 8192  # top_k * retrieval width the fused select kernel is run with
FLEX_ALIGN = 128  # FlexAttention's block: lengths it takes (others take the banded SDPA path)
# FlexAttention backward tiles by head dim, for bf16 / fp16 on Hopper (compute capability 9), where measured
# better than its defaults for the band: D = 64, window 512, 16K tokens, H200: 0.626 instead of 0.775 ms
# (benchmarks/flex_window.py, docs/benchmarks.md); inside compiled units the training step ran no faster with
# them (session 13). Other head dims, dtypes and GPUs keep FlexAttention's choice.
FLEX_BACKWARD_TILES = {64: dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=32,
                                bwd_num_warps=4, bwd_num_stages=3)}


class HSATriton(AttentionBackend):
    aliases = ("triton",)
    requires = ("triton",)
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})
    masks_documents = True
    incremental = True

    def check_runtime(self, device: torch.device, dtype: torch.dtype) -> None:
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            device = torch.device("cuda")  # the interpreter stands in for the GPU
        super().check_runtime(device, dtype)

    def check_static(self, config: ModelConfig) -> None:
        super().check_static(config)
        for field, value in (("head_dim", config.resolved_head_dim), ("chunk_size", config.chunk_size)):
            if value < 16 or value & (value - 1):
                raise PluginError(f"attention backend HSATriton needs {field} to be a power of two >= 16, got {field}={value}")

    def local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        window: Optional[int], doc_start: Optional[torch.Tensor] = None) -> torch.Tensor:
        if doc_start is None and q.is_cuda and window is not None and window < q.shape[1]:
            if q.shape[1] % FLEX_ALIGN == 0:  # training shapes; each new length compiles once
                return _flex_sliding_window(q, k, v, window)
            with prefer_fused_sdpa(q):  # odd lengths (evaluation, the end of a prompt): nothing to compile
                return banded_window_attention(q, k, v, window)
        with prefer_fused_sdpa(q):
            return super().local_attention(q, k, v, window, doc_start)

    def select(self, q_slc, landmarks, top_k, chunk_size, gumbel, doc_start=None, query_start=0):
        from hsa_lightning.kernels.retrieval.parallel import TOKENS_PER_BLOCK, select_chunks_fused

        dr = q_slc.shape[-1]
        # Noise, document masks, odd widths and wide top-k x width (a curriculum's "all chunks", whose
        # kernel tile would not fit in shared memory) take the reference path, exact and cheap at the
        # short lengths where they occur. So do a few queries (decode): the fused kernel would scan every
        # landmark in one program per head, while the reference is a batched matrix-vector + top-k.
        wide = min(top_k, landmarks.shape[1]) * dr > MAX_FUSED_TOPK_X_WIDTH
        few = q_slc.shape[1] < TOKENS_PER_BLOCK
        if gumbel or doc_start is not None or dr < 16 or dr & (dr - 1) or wide or few:
            return super().select(q_slc, landmarks, top_k, chunk_size, gumbel, doc_start, query_start)
        return select_chunks_fused(q_slc, landmarks, top_k, chunk_size, query_start)

    def memory_attention(self, q: torch.Tensor, memory: ChunkMemory, selection: Selection,
                         doc_start: Optional[torch.Tensor] = None, query_start: int = 0) -> torch.Tensor:
        from hsa_lightning.kernels.hsa.joint import joint_chunk_attention
        from hsa_lightning.kernels.hsa.parallel import hsa_attention, uses_chunk_kernels

        args = (q, memory.k, memory.v, selection.weights, selection.indices, memory.chunk_size)
        if selection.read == "union":
            return joint_chunk_attention(*args)
        # The kernel family follows the memory (one landmark per chunk), not the K/V passed in: offloaded
        # inference passes the union of all rows' selected chunks and must compute what resident inference does.
        memory_len = memory.landmarks.shape[1] * memory.chunk_size
        by_chunk = uses_chunk_kernels(q, memory_len, q.shape[2] // memory.k.shape[2], selection.indices.shape[-1])
        per_chunk = hsa_attention(*args, by_chunk=by_chunk)
        return per_chunk if selection.read == "chunks" else 0.5 * (per_chunk + joint_chunk_attention(*args))


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def sliding_window_block_mask(T: int, window: int, device):
    """FlexAttention's block mask for causal attention over the last ``window`` keys (T a multiple of 128),
    built from the band's tile structure with a few small tensor ops: inside a compiled unit it joins the
    graph instead of breaking it, and it never evaluates the (T, T) mask."""
    from torch.nn.attention.flex_attention import BlockMask

    def keep(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    n = T // FLEX_ALIGN
    tiles = torch.arange(n, device=device)
    offset = (tiles[:, None] - tiles[None, :]) * FLEX_ALIGN  # query tile start - key tile start
    nearest, farthest = offset - (FLEX_ALIGN - 1), offset + (FLEX_ALIGN - 1)  # extremes of q - kv in a tile
    full = (nearest >= 0) & (farthest < window)
    partial = (farthest >= 0) & (nearest < window) & ~full

    def packed(tile_kept):  # per query tile: how many key tiles, and which (ascending, then the rest)
        order = torch.argsort((~tile_kept).to(torch.int32), dim=-1, stable=True)
        return tile_kept.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(*packed(partial), *packed(full), BLOCK_SIZE=FLEX_ALIGN, mask_mod=keep)


@functools.lru_cache(maxsize=64)
def _cached_sliding_window_block_mask(T: int, window: int, device: str):
    # built as normal tensors even when first asked for under inference mode (evaluation), so a later
    # training step can save the cached mask for backward
    with torch.inference_mode(False):
        return sliding_window_block_mask(T, window, device)


def _flex_sliding_window(q, k, v, window):
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # a few fused kernels in the unit's graph
        mask = sliding_window_block_mask(q.shape[1], window, q.device)
    else:
        mask = _cached_sliding_window_block_mask(q.shape[1], window, str(q.device))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    # inside a compiled unit flex_attention joins the unit's graph; eagerly it needs its own compile
    flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    measured = q.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_properties(q.device).major == 9
    options = FLEX_BACKWARD_TILES.get(q.shape[-1]) if measured else None
    out = flex(qh, kh, vh, block_mask=mask, enable_gqa=qh.shape[1] != kh.shape[1], kernel_options=options)
    return out.transpose(1, 2)
