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
                 score: Literal["both", "copy"] = "both"):
        """
        Args:
            score: ``"both"`` halves are scored (the paper does not say otherwise), or only the ``"copy"``:
                then every gradient of the stage comes from copying, none from modelling the first half.
        """
        super().__init__(steps, seq_len, window, top_k, lr_scale, synthetic_share)
        if score not in ("both", "copy"):
            raise ConfigError(f"curriculum stage SelfCopy score={score!r} must be 'both' or 'copy'")
        self.score = score

    def transform(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, labels = batch["input_ids"], batch["labels"]
        half = x.shape[1] // 2
        first = x[:, :half]
        # labels: inside each copy the next token; the end of the first copy predicts the copy's start
        if self.score == "copy":
            head = torch.full_like(labels[:, :half], IGNORE_INDEX)
        else:
            head = torch.cat([labels[:, : half - 1], first[:, :1]], dim=1)
        out = {k: v for k, v in batch.items() if k != "doc_start"}  # the copy must see across the split
        out.update(input_ids=torch.cat([first, first], dim=1), labels=torch.cat([head, labels[:, :half]], dim=1))
        return out
