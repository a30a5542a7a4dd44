from hsa_lightning.kernels.cross_entropy.naive import (IGNORE_INDEX, linear_cross_entropy_reference,
                                                       logit_rows_reference_)
from hsa_lightning.kernels.cross_entropy.parallel import linear_cross_entropy

__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "linear_cross_entropy_reference", "logit_rows_reference_"]
