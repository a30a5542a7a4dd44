"""SWA: sliding-window attention in every block (local-only baseline)."""
from __future__ import annotations

from hsa_lightning.model import layout


class SWA(layout.LayerLayout):
    def plan(self, n_layers: int) -> list[str]:
        return [layout.SWA] * n_layers
