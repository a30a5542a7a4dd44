"""UltraLong: the paper's layout. Lower half SWA, the chunk encoder, then G groups of (HSA + R SWA)."""
from __future__ import annotations

from typing import Optional

from hsa_lightning.errors import ConfigError
from hsa_lightning.model.layout import ENCODER, HSA, SWA, LayerLayout


class UltraLong(LayerLayout):
    def __init__(self, groups: int = 2, lower_layers: Optional[int] = None, swa_per_group: Optional[int] = None):
        """``lower_layers`` default n_layers // 2; ``swa_per_group`` (R) is derived, and checked if given."""
        if groups < 1:
            raise ConfigError(f"UltraLong groups={groups} must be >= 1")
        if lower_layers is not None and lower_layers < 0:
            raise ConfigError(f"UltraLong lower_layers={lower_layers} must be >= 0")
        self.groups, self.lower_layers, self.swa_per_group = groups, lower_layers, swa_per_group

    def plan(self, n_layers: int) -> list[str]:
        lower = n_layers // 2 if self.lower_layers is None else self.lower_layers
        upper = n_layers - lower
        if upper < self.groups or upper % self.groups:
            raise ConfigError(
                f"UltraLong: the upper decoder has n_layers - lower_layers = {n_layers} - {lower} = {upper} "
                f"blocks, which must be a positive multiple of groups={self.groups}"
            )
        r = upper // self.groups - 1
        if self.swa_per_group is not None and self.swa_per_group != r:
            raise ConfigError(
                f"UltraLong swa_per_group={self.swa_per_group} does not fit n_layers={n_layers}: "
                f"{lower} lower + {self.groups} x (1 HSA + R SWA) blocks needs R={r}"
            )
        return [SWA] * lower + [ENCODER] + ([HSA] + [SWA] * r) * self.groups
