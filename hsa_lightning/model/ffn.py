"""FFN plugin kind: builds the feed-forward module of every block (dense SwiGLU, later MoE)."""
from __future__ import annotations

from torch import nn

from hsa_lightning.registry import Registry, kind_registry


class FFN:
    """A factory: ``build(d_model, layer_index, init_std, out_std)`` returns an nn.Module mapping (B, T, d) -> (B, T, d).

    ``layer_index`` is -1 for the chunk encoder; MoE uses it to keep the first layer dense.
    ``out_std`` is the init std of the projection back into the residual stream.
    """

    def build(self, d_model: int, layer_index: int, init_std: float, out_std: float) -> nn.Module:
        raise NotImplementedError


FFN_REGISTRY: Registry[FFN] = kind_registry("ffn", FFN)
