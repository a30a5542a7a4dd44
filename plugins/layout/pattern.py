"""Pattern: any layout as a string, one letter per block.

``S`` SWA block, ``F`` full-attention block, ``H`` HSA block, ``|`` the chunk encoder (between blocks);
spaces are ignored. The paper's 8-layer layout with 2 groups is ``"SSSS|HSHS"``.
"""
from __future__ import annotations

from hsa_lightning.errors import ConfigError
from hsa_lightning.model.layout import ENCODER, FULL, HSA, SWA, LayerLayout

_STEPS = {"S": SWA, "F": FULL, "H": HSA, "|": ENCODER}


class Pattern(LayerLayout):
    def __init__(self, pattern: str = "SSSS|HSHS"):
        letters = pattern.replace(" ", "")
        bad = sorted(set(letters) - set(_STEPS))
        if bad or not letters:
            raise ConfigError(
                f"Pattern pattern={pattern!r} has unknown letters {bad}; use S (SWA), F (full), H (HSA), | (encoder)"
            )
        self.pattern = pattern
        self.steps = [_STEPS[c] for c in letters]

    def plan(self, n_layers: int) -> list[str]:
        blocks = sum(s != ENCODER for s in self.steps)
        if blocks != n_layers:
            raise ConfigError(f"Pattern pattern={self.pattern!r} has {blocks} blocks but n_layers={n_layers}")
        return list(self.steps)
