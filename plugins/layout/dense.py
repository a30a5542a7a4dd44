"""Dense: full causal attention in every block (the standard Transformer baseline)."""
from __future__ import annotations

from hsa_lightning.model.layout import FULL, LayerLayout


class Dense(LayerLayout):
    def plan(self, n_layers: int) -> list[str]:
        return [FULL] * n_layers
