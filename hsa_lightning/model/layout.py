"""Layer-layout plugin kind: which block sits at each depth, and where the chunk encoder reads.

A plan is a list of steps, each one of:
  ``swa``      a block with sliding-window causal attention (RoPE) and an FFN
  ``full``     a block with full causal attention and an FFN
  ``hsa``      an HSA block: retrieval + internal SWA + sparse chunk attention, bypass into the FFN
  ``encoder``  not a block: the chunk encoder turns the current hidden state into the shared memory
Every ``hsa`` step must come after exactly one ``encoder`` step.
"""
from __future__ import annotations

from hsa_lightning.errors import ConfigError
from hsa_lightning.registry import Registry, kind_registry

SWA, FULL, HSA, ENCODER = "swa", "full", "hsa", "encoder"


class LayerLayout:
    def plan(self, n_layers: int) -> list[str]:
        raise NotImplementedError


def check_plan(plan: list[str], n_layers: int, owner: str) -> list[str]:
    """Validate a plan against the layout rules above; returns it unchanged."""
    blocks = [s for s in plan if s != ENCODER]
    if len(blocks) != n_layers:
        raise ConfigError(f"layout {owner} has {len(blocks)} blocks but n_layers={n_layers}")
    unknown = sorted({s for s in plan} - {SWA, FULL, HSA, ENCODER})
    if unknown:
        raise ConfigError(f"layout {owner} has unknown steps {unknown}; steps are swa, full, hsa, encoder")
    if plan.count(ENCODER) > 1:
        raise ConfigError(f"layout {owner} places the chunk encoder {plan.count(ENCODER)} times; at most once")
    if HSA in plan and (ENCODER not in plan or plan.index(ENCODER) > plan.index(HSA)):
        raise ConfigError(f"layout {owner} has an HSA block before the chunk encoder; HSA reads its memory")
    return plan


LAYOUT: Registry[LayerLayout] = kind_registry("layout", LayerLayout)
