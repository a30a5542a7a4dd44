"""How ``configure_model`` prepares HSALM for its strategy (DESIGN section 7), one unit (the chunk encoder,
each block) at a time, in torchtitan's order: activation checkpointing, then ``torch.compile``, then, under
``ModelParallelStrategy``, FSDP2's ``fully_shard`` per unit and on the root.

    model:
      parallel: {activation_checkpointing: true, compile: true, param_dtype: bf16, reduce_dtype: fp32}

Checkpointing and compilation keep parameter names (they act inside each unit's call), so checkpoints
load across these settings and across strategies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hsa_lightning.model.hsalm import HSALM

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ParallelConfig:
    activation_checkpointing: bool = False
    """Recompute each unit's activations in backward: memory of one unit's activations, ~1/3 more compute."""
    compile: bool = False
    """``torch.compile`` each unit (fuses norms, RoPE and the MLP's elementwise work)."""
    param_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """FSDP2 only: the dtype units compute in; the sharded master weights and the optimizer stay fp32."""
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """FSDP2 only: the dtype gradients are reduce-scattered in."""
    reshard_after_forward: bool = True
    """FSDP2 only: free each unit's gathered parameters after its forward (gathered again for backward)."""


def prepare(model: HSALM, config: ParallelConfig, mesh=None) -> HSALM:
    """Checkpointing and compilation per unit; with a device
    ``mesh``, FSDP2 sharding of every unit and then of the root (the embedding, tied head and final norm).
    ``loss`` becomes an FSDP entry point beside ``forward``."""
    units = model.units()
    for unit in units:
        unit.recompute = config.activation_checkpointing
    if config.compile:
        # Each unit's own ``compute``, so each kind of unit (its class's code object) has its own dynamo
        # cache and recompile limit; static shapes, so a new length (a curriculum stage) compiles its own
        # graphs instead of turning all of them dynamic. Module and parameter names stay.
        for unit in units:
            unit.compute = torch.compile(unit.compute, dynamic=False)
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        policy = MixedPrecisionPolicy(param_dtype=DTYPES[config.param_dtype],
                                      reduce_dtype=DTYPES[config.reduce_dtype])
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=config.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=config.reshard_after_forward)
        register_fsdp_forward_method(model, "loss")
    return model


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model on ``device`` (shards only, once sharded) and initialise it with each
    module's own ``reset_parameters``."""
    model.to_empty(device=device)
    for module in model.modules():
        owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if owns and hasattr(module, "reset_parameters"):
            module.reset_parameters()
