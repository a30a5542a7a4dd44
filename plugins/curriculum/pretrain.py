"""Pretrain: the main stage, the configured window (the paper: SWA 4K) and sparse top-k."""
from hsa_lightning.curriculum import CurriculumStage


class Pretrain(CurriculumStage):
    pass
