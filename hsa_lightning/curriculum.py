"""Curriculum-stage plugin kind.

A stage changes training at a step boundary (sequence length, SWA window, top-k, LR multiplier, ...).
The callback that applies a list of stages and the paper's built-in stages arrive with the training-at-
scale issue; this module fixes the seam so third-party stages can register today.
"""
from __future__ import annotations

from typing import Any

from hsa_lightning.registry import Registry, kind_registry


class CurriculumStage:
    """One stage; ``apply`` receives the batch and may return a transformed one."""

    def apply(self, trainer: Any, module: Any, batch: Any) -> Any:
        raise NotImplementedError


CURRICULUM: Registry[CurriculumStage] = kind_registry("curriculum", CurriculumStage)
