"""Stage: a curriculum stage with exactly the settings given (everything else from the configuration)."""
from hsa_lightning.curriculum import CurriculumStage


class Stage(CurriculumStage):
    pass
