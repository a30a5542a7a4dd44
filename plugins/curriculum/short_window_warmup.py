"""ShortWindowWarmup: the paper's first stage, SWA 512 with dense HSA (every visible chunk retrieved).

A small window leaves short-range dependencies to HSA, so retrieval learns on short ranges what it
later transfers to long ones (the paper's HSA/SWA "seesaw").
"""
from typing import Optional

from hsa_lightning.curriculum import CurriculumStage, TopK


class ShortWindowWarmup(CurriculumStage):
    def __init__(self, steps: Optional[int] = None, seq_len: Optional[int] = None, window: Optional[int] = 512,
                 top_k: Optional[TopK] = "all", lr_scale: float = 1.0, synthetic_share: Optional[float] = None):
        super().__init__(steps, seq_len, window, top_k, lr_scale, synthetic_share)
