"""LongContextMidtrain: longer sequences with dense HSA (the paper: 32K tokens, top-k covering all chunks)."""
from typing import Optional

from hsa_lightning.curriculum import CurriculumStage, TopK


class LongContextMidtrain(CurriculumStage):
    def __init__(self, steps: Optional[int] = None, seq_len: Optional[int] = None, window: Optional[int] = None,
                 top_k: Optional[TopK] = "all", lr_scale: float = 1.0, synthetic_share: Optional[float] = None):
        super().__init__(steps, seq_len, window, top_k, lr_scale, synthetic_share)
