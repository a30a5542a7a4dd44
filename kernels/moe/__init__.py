from hsa_lightning.kernels.moe.naive import routed_experts_reference
from hsa_lightning.kernels.moe.parallel import routed_experts

__all__ = ["routed_experts", "routed_experts_reference"]
