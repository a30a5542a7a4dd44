"""Did retrieval pick the chunk an answer token is copied from? Tells a retrieval miss (the needle's chunk
was not read) from an attention miss (it was read, and the wrong token came out)."""
from __future__ import annotations

import torch
from torch import nn

from hsa_lightning.model.retrieval import Retrieval


class SourceChunkWatch:
    """While open, every retrieval layer of ``model`` reports, for each query position in ``positions``,
    whether it picked (with a nonzero weight) the chunk in ``chunks`` at the same index; ``hits`` (batch,
    len(positions)) is the OR over layers and heads, for every row of the batch, ``weights`` the largest
    fusion weight any layer and head gave that chunk, summed over a head's slots holding it (0 where none
    picked it: a pick outweighed by the others is read little), and ``seen`` says whether any retrieval
    call reached a watched position. Works for the whole-sequence forward and for the inference engine's
    segments (whose retrieval calls carry the segment's ``query_start``)."""

    def __init__(self, model: nn.Module, positions: list[int], chunks: list[int], batch: int = 1):
        self.model = model
        self.positions = torch.tensor(positions, dtype=torch.long)
        self.chunks = torch.tensor(chunks, dtype=torch.long)
        # fp32 whatever the default dtype (Lightning's bf16-true precision makes bf16 the default in the test step)
        self.weights = torch.zeros(batch, len(positions), dtype=torch.float32)
        self.seen = False
        self._hooks: list = []

    @property
    def hits(self) -> torch.Tensor:
        return self.weights > 0  # a chunk counts as picked only with a nonzero weight (padding slots carry 0)

    def __enter__(self) -> "SourceChunkWatch":
        self._hooks = [m.register_forward_hook(self._record, with_kwargs=True)
                       for m in self.model.modules() if isinstance(m, Retrieval)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _record(self, module, args, kwargs, selection) -> None:
        # Retrieval.forward(x, landmarks, doc_start=None, query_start=0): rows of x sit at query_start..
        start = kwargs.get("query_start", args[3] if len(args) > 3 else 0)
        rows = selection.indices.shape[1]
        inside = (self.positions >= start) & (self.positions < start + rows)
        if not inside.any():
            return
        self.seen = True
        at = (self.positions[inside] - start).to(selection.indices.device)
        picked = selection.indices[:, at] == self.chunks[inside].to(at.device)[:, None, None]  # (B, n, heads, k)
        weights = selection.weights[:, at].float()
        picked &= weights > 0  # padding slots carry weight 0
        # a head that reads the chunk twice (a pick and the successor of the pick before it: read_successor)
        # gives it both slots' weights; then the largest over heads
        weight = torch.where(picked, weights, 0.0).sum(-1).amax(-1).cpu()
        self.weights[:, inside] = torch.maximum(self.weights[:, inside], weight)
