"""Curriculum-stage plugin kind: what one stage of training sets, and for how long.

A stage lasts ``steps`` optimizer steps (the last may run to the end). While it is active it sets
whichever of ``seq_len`` (batches are reshaped, tokens per step stay constant), ``window`` (every
sliding window), ``top_k`` (an int, or ``"all"``: every visible chunk), ``lr_scale`` and
``synthetic_share`` it gives, and ``transform`` may rewrite each batch. The ``Curriculum`` callback
(``hsa_lightning/lit/curriculum_callback.py``) applies a list of stages.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch

from hsa_lightning.errors import ConfigError
from hsa_lightning.registry import Registry, kind_registry

TopK = Union[int, Literal["all"]]


class CurriculumStage:
    def __init__(self, steps: Optional[int] = None, seq_len: Optional[int] = None, window: Optional[int] = None,
                 top_k: Optional[TopK] = None, lr_scale: float = 1.0, synthetic_share: Optional[float] = None):
        """
        Args:
            steps: optimizer steps this stage lasts; None: until training ends (last stage only).
            seq_len: tokens per training sequence (the data module keeps tokens per step).
            window: sliding-window size of every SWA layer and of the HSA layers' own SWA.
            top_k: chunks each token retrieves; ``"all"``: every visible chunk (dense HSA).
            lr_scale: multiplies the learning-rate schedule while the stage is active.
            synthetic_share: share of synthetic retrieval samples in the training data.
        """
        name = type(self).__name__
        for field, value in (("steps", steps), ("seq_len", seq_len), ("window", window)):
            if value is not None and value < 1:
                raise ConfigError(f"curriculum stage {name} {field}={value} must be >= 1")
        if top_k is not None and top_k != "all" and (not isinstance(top_k, int) or top_k < 1):
            raise ConfigError(f"curriculum stage {name} top_k={top_k!r} must be >= 1 or 'all'")
        if lr_scale <= 0:
            raise ConfigError(f"curriculum stage {name} lr_scale={lr_scale} must be > 0")
        if synthetic_share is not None and not 0.0 <= synthetic_share <= 1.0:
            raise ConfigError(f"curriculum stage {name} synthetic_share={synthetic_share} must be within [0, 1]")
        self.steps, self.seq_len, self.window, self.top_k = steps, seq_len, window, top_k
        self.lr_scale, self.synthetic_share = lr_scale, synthetic_share

    @property
    def name(self) -> str:
        return type(self).__name__

    def lr_scale_at(self, progress: float) -> float:
        """The learning-rate multiplier at ``progress`` (0..1) through the stage."""
        return self.lr_scale

    def transform(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rewrite a training batch (after it reached the device); the default keeps it."""
        return batch


CURRICULUM: Registry[CurriculumStage] = kind_registry("curriculum", CurriculumStage)
