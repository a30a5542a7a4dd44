"""SelfCopy: the paper's self-copy warm-up; every sequence becomes S || S (its first half, twice), so the
second half is predicted by retrieving the first (the best MQ-NIAH extrapolation in the paper's Table 2)."""
import torch

from hsa_lightning.curriculum import CurriculumStage


class SelfCopy(CurriculumStage):
    def transform(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, labels = batch["input_ids"], batch["labels"]
        half = x.shape[1] // 2
        first = x[:, :half]
        # labels: inside each copy the next token; the end of the first copy predicts the copy's start
        copy_labels = torch.cat([labels[:, : half - 1], first[:, :1], labels[:, :half]], dim=1)
        out = {k: v for k, v in batch.items() if k != "doc_start"}  # the copy must see across the split
        out.update(input_ids=torch.cat([first, first], dim=1), labels=copy_labels)
        return out
