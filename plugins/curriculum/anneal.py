"""Anneal: the learning-rate multiplier falls linearly from ``lr_scale`` to ``final_lr_scale`` over the stage."""
from typing import Optional

from hsa_lightning.curriculum import CurriculumStage, TopK
from hsa_lightning.errors import ConfigError


class Anneal(CurriculumStage):
    def __init__(self, steps: Optional[int] = None, seq_len: Optional[int] = None, window: Optional[int] = None,
                 top_k: Optional[TopK] = None, lr_scale: float = 1.0, synthetic_share: Optional[float] = None,
                 final_lr_scale: float = 0.0):
        super().__init__(steps, seq_len, window, top_k, lr_scale, synthetic_share)
        if not 0.0 <= final_lr_scale <= lr_scale:
            raise ConfigError(f"curriculum stage Anneal final_lr_scale={final_lr_scale} must be within [0, lr_scale={lr_scale}]")
        self.final_lr_scale = final_lr_scale

    def lr_scale_at(self, progress: float) -> float:
        return self.lr_scale + (self.final_lr_scale - self.lr_scale) * progress
