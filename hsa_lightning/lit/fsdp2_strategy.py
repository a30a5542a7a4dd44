"""FSDP2Strategy: Lightning's ModelParallelStrategy for data parallelism only.

ModelParallelStrategy's "auto" sizes split tensors over the devices of a node and shard data only across
nodes, so on one machine it would give HSALM (which has no tensor-parallel plan) a data-parallel mesh of
size 1: every device trains alone. Here every device of every node is one data-parallel rank that
shards the model with ``fully_shard`` (``HSALitModule.configure_model``).

    trainer:
      strategy: {class_path: FSDP2Strategy}
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout):
        """
        Args:
            save_distributed_checkpoint: each rank writes its shards (a DCP folder); False gathers a
                single file on rank 0.
            process_group_backend: default nccl on GPUs, gloo on CPU.
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
