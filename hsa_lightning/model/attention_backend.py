"""Attention-backend plugin kind: how attention is computed, not what it means.

The model owns every parameter; a backend is a stateless strategy object the blocks call with
tensors. It computes two things:
  ``local_attention``   causal (optionally sliding-window) attention of SWA and full blocks
  ``memory_attention``  what an HSA block's query reads from the shared chunk memory
Backends declare their capabilities as class attributes; the model checks them when it is
configured, never at the first forward.

Incremental inference (``incremental``): ``select`` and ``memory_attention`` take ``query_start``, the
absolute position of the first query row, so a prompt segment or one decoded token reads every
earlier chunk of an inference cache (``hsa_lightning/inference``).

Document masking (``masks_documents``): ``doc_start`` (B, T) holds the first position of each token's
document; attention and retrieval then never cross a document boundary. It is passed only when the
data asks for it, so backends without the capability keep the plain signatures.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F

from hsa_lightning.errors import PluginError
from hsa_lightning.kernels.retrieval import retrieval_scores, select_chunks
from hsa_lightning.model.config import Fusion, ModelConfig
from hsa_lightning.registry import Registry, kind_registry

FUSIONS = get_args(Fusion)


@dataclass
class ChunkMemory:
    """The shared memory every HSA block reads, built once from the mid-layer state."""

    k: torch.Tensor  # (B, Lm, Hkv, D), Lm a multiple of chunk_size (the last chunk may hold padding)
    v: torch.Tensor  # (B, Lm, Hkv, D)
    landmarks: torch.Tensor  # (B, Lm / chunk_size, Hkv, Dr), one per chunk and HSA KV head
    chunk_size: int

    def resident(self, selection: Selection) -> tuple["ChunkMemory", Selection]:
        """The memory and selection to compute with on the device; an offloaded memory
        (``hsa_lightning/inference``) copies just the selected chunks in and renumbers them."""
        return self, selection


# A pytree node, so module hooks that look for tensors in outputs (FSDP2's pre-backward hook, which gathers
# the chunk encoder's weights again for its backward) find k, v and the landmarks.
torch.utils._pytree.register_dataclass(ChunkMemory)


@dataclass
class Selection:
    """Which chunks each token reads and how their outputs are fused (one row per HSA KV head)."""

    indices: torch.Tensor  # (B, T, Hkv, K) int64; padding slots hold a valid index and weight 0
    weights: torch.Tensor  # (B, T, Hkv, K) float32 fusion weights
    # "chunks": each selected chunk read alone, outputs fused by the weights (the paper's); ablations:
    # "union": one softmax over the union of the selected chunks' keys, log weights added to their logits;
    # "both": the mean of the two
    read: Literal["chunks", "union", "both"] = "chunks"


class AttentionBackend:
    #: whether HSA blocks must run retrieval before ``memory_attention``
    needs_retrieval: ClassVar[bool] = True
    #: device types (``torch.device.type``) the backend runs on
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    #: parameter/compute dtypes it supports
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset(
        {torch.float64, torch.float32, torch.bfloat16, torch.float16}
    )
    #: importable modules it needs (for example ``("triton",)``)
    requires: ClassVar[tuple[str, ...]] = ()
    #: fusion rules (model config ``fusion``) it implements
    fusions: ClassVar[frozenset[str]] = frozenset(FUSIONS)
    #: extra names it can be selected by
    aliases: ClassVar[tuple[str, ...]] = ()
    #: whether its methods take ``doc_start`` (document masking)
    masks_documents: ClassVar[bool] = False
    #: whether ``select`` and ``memory_attention`` take ``query_start`` (incremental inference)
    incremental: ClassVar[bool] = False

    # -- capabilities --------------------------------------------------------------------------
    def check_static(self, config: ModelConfig) -> None:
        """Checks that need no device: dependencies and the model's semantics and shapes.
        Raised at configuration time; backends with shape limits extend it."""
        name = type(self).__name__
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise PluginError(f"attention backend {name} needs {', '.join(missing)}, which is not installed")
        if config.fusion not in self.fusions:
            raise PluginError(
                f"attention backend {name} does not support fusion={config.fusion!r}; "
                f"it supports {sorted(self.fusions)}"
            )

    def check_runtime(self, device: torch.device, dtype: torch.dtype) -> None:
        """Checks against the device and dtype the model is configured for."""
        name = type(self).__name__
        if device.type not in self.devices:
            raise PluginError(
                f"attention backend {name} does not run on device={device.type!r}; it runs on {sorted(self.devices)}"
            )
        if dtype not in self.dtypes:
            raise PluginError(
                f"attention backend {name} does not support dtype={dtype}; it supports "
                f"{sorted(str(d) for d in self.dtypes)}"
            )

    # -- compute -------------------------------------------------------------------------------
    def local_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
        doc_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention, (B, T, H, D) x (B, T, Hkv, D) -> (B, T, H, D).

        Token t sees keys t-window+1 .. t (``window`` keys including itself), or all of 0..t when
        ``window`` is None; with ``doc_start`` only keys of its own document. This default is exact
        everywhere; backends override it with faster kernels.
        """
        T = q.shape[1]
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        gqa = qh.shape[1] != kh.shape[1]
        if doc_start is not None:
            mask = sliding_window_mask(T, T if window is None else window, q.device)
            mask = mask[None] & (torch.arange(T, device=q.device)[None, None, :] >= doc_start[:, :, None])
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None], enable_gqa=gqa)
        elif window is None or window >= T:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa)
        else:
            return banded_window_attention(q, k, v, window)
        return out.transpose(1, 2)

    def select(
        self, q_slc: torch.Tensor, landmarks: torch.Tensor, top_k: int, chunk_size: int, gumbel: bool,
        doc_start: torch.Tensor | None = None, query_start: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Retrieval: (indices, valid, selected scores), each (B, T, Hkv, K), slots most recent first.

        Scores are <q_slc, landmark> / sqrt(Dr) over visible chunks; ``gumbel`` perturbs the choice
        only (the returned scores are clean). Query row r sits at position ``query_start + r``. This
        default is the reference (an exact scan: at decode a batched matrix-vector product and top-k);
        backends may fuse it.
        """
        scores = retrieval_scores(q_slc, landmarks, chunk_size, doc_start, query_start)
        noise = -torch.log(torch.empty_like(scores).exponential_()) if gumbel else None
        indices, valid = select_chunks(scores, top_k, noise)
        return indices, valid, torch.gather(scores, -1, indices)

    def memory_attention(
        self, q: torch.Tensor, memory: ChunkMemory, selection: Selection | None,
        doc_start: torch.Tensor | None = None, query_start: int = 0,
    ) -> torch.Tensor:
        """What HSA queries (B, T, H, D) at positions ``query_start``.. read from ``memory``;
        ``selection`` is None when ``needs_retrieval`` is False (``doc_start`` and ``query_start`` then
        matter). Must return zeros for tokens that see no complete chunk."""
        raise NotImplementedError


def with_doc_start(doc_start: torch.Tensor | None) -> dict:
    """Keyword arguments for a backend call: ``doc_start`` only when documents are masked."""
    return {} if doc_start is None else {"doc_start": doc_start}


def with_query_start(query_start: int) -> dict:
    """Keyword arguments for a backend call: ``query_start`` only in incremental inference, so
    backends without the ``incremental`` capability keep the plain signatures for training."""
    return {"query_start": query_start} if query_start else {}


def prefer_fused_sdpa(q: torch.Tensor):
    """A context preferring cuDNN, then flash, then memory-efficient SDPA kernels on CUDA; no-op elsewhere."""
    if not q.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def banded_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                            block: int = 1024) -> torch.Tensor:
    """Exact sliding-window causal attention for any length, linear in it and with nothing to compile:
    each block of ``block`` queries attends (SDPA with a band mask) to the keys its window reaches."""
    T = q.shape[1]
    gqa = q.shape[2] != k.shape[2]
    out = []
    for start in range(0, T, block):
        end, first = min(start + block, T), max(0, start - window + 1)
        dist = torch.arange(start, end, device=q.device)[:, None] - torch.arange(first, end, device=q.device)[None, :]
        qh, kh, vh = q[:, start:end].transpose(1, 2), k[:, first:end].transpose(1, 2), v[:, first:end].transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=(dist >= 0) & (dist < window), enable_gqa=gqa)
        out.append(o.transpose(1, 2))
    return torch.cat(out, 1)


def sliding_window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where query t may attend key j: t - window < j <= t."""
    t = torch.arange(T, device=device)
    diff = t[:, None] - t[None, :]
    return (diff >= 0) & (diff < window)


ATTENTION: Registry[AttentionBackend] = kind_registry("attention", AttentionBackend)
