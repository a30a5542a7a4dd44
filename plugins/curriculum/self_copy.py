"""SelfCopy: the paper's self-copy warm-up; every sequence becomes S || S (its first half, twice), so the
second half is predicted by retrieving the first (the best MQ-NIAH extrapolation in the paper's Table 2)."""
from typing import Literal, Optional

import torch

from hsa_lightning.curriculum import CurriculumStage, TopK
from hsa_lightning.errors import ConfigError
from hsa_lightning.kernels.cross_entropy import IGNORE_INDEX


class SelfCopy(CurriculumStage):
    def __init__(self, steps: Optional[int] = None, seq_len: Optional[int] = None, window: Optional[int] = None,
                 top_k: Optional[TopK] = None, lr_scale: float = 1.0, synthetic_share: Optional[float] = None,
                 score: Literal["both", "copy"] = "both", copy_share: float = 1.0):
        """
        Args:
            score: ``"both"`` halves are scored (the paper does not say otherwise), or only the ``"copy"``:
                then every gradient of the stage comes from copying, none from modelling the first half.
            copy_share: share of each batch's sequences made S || S (the first ``round(copy_share * rows)``;
                batches arrive shuffled); the others train as they are. Below 1 a later stage keeps some
                copying in the mix (not the paper's recipe).
        """
        super().__init__(steps, seq_len, window, top_k, lr_scale, synthetic_share)
        if score not in ("both", "copy"):
            raise ConfigError(f"curriculum stage SelfCopy score={score!r} must be 'both' or 'copy'")
        if not 0.0 < copy_share <= 1.0:
            raise ConfigError(f"curriculum stage SelfCopy copy_share={copy_share} must be within (0, 1]")
        self.score, self.copy_share = score, copy_share

    def transform(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, labels = batch["input_ids"], batch["labels"]
        rows, half = round(self.copy_share * x.shape[0]), x.shape[1] // 2
        first = x[:rows, :half]
        # labels: inside each copy the next token; the end of the first copy predicts the copy's start
        if self.score == "copy":
            head = torch.full_like(labels[:rows, :half], IGNORE_INDEX)
        else:
            head = torch.cat([labels[:rows, : half - 1], first[:, :1]], dim=1)
        out = dict(batch)
        out["input_ids"], out["labels"] = x.clone(), labels.clone()
        out["input_ids"][:rows, :2 * half] = torch.cat([first, first], dim=1)
        out["labels"][:rows, :2 * half] = torch.cat([head, labels[:rows, :half]], dim=1)
        out["labels"][:rows, 2 * half:] = IGNORE_INDEX  # an odd length's last position has nothing to copy
        if "doc_start" in batch:  # a copied sequence is one document: the copy must see across the split
            out["doc_start"] = batch["doc_start"].clone()
            out["doc_start"][:rows] = 0
        return out
