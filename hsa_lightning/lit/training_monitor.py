"""TrainingMonitor: throughput, model FLOPs utilisation and gradient norm, logged per step.

    trainer:
      callbacks:
        - class_path: TrainingMonitor       # optional: init_args: {peak_tflops: 989}

Logged each step (written every ``trainer.log_every_n_steps``) to whatever logger the run has (CSV by
default, TensorBoard when configured): ``perf/tokens_per_s`` (all ranks, the step's wall time, data
loading included), ``perf/tokens_seen`` (also on the progress bar), ``perf/mfu`` (when the device's
peak is known: ``HSALM.flops_per_token`` x tokens/s / (peak x devices), with the step's curriculum
window and top-k) and ``train/grad_norm`` (before clipping). The ``Curriculum`` callback logs ``curriculum/stage`` beside them.
"""
from __future__ import annotations

import time
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.tensor import DTensor

from hsa_lightning.errors import ConfigError

# dense bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class TrainingMonitor(L.Callback):
    def __init__(self, peak_tflops: Optional[float] = None):
        """
        Args:
            peak_tflops: one device's peak for the MFU denominator; default from the device name
                (H100/H200 989, A100 312), none on CPU (MFU is then not logged).
        """
        if peak_tflops is not None and peak_tflops <= 0:
            raise ConfigError(f"TrainingMonitor peak_tflops={peak_tflops} must be > 0")
        self.peak_tflops = peak_tflops
        self.tokens_seen = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = self.peak_tflops
        if peak is None and pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        self._peak = None if peak is None else peak * 1e12 * trainer.world_size
        self._last = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # FLOPs with this step's settings (a curriculum changes window and top-k between steps)
        self._flops = pl_module.model.flops_per_token(batch["input_ids"].shape[1]) if self._peak is not None else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        norm = gradient_norm(pl_module.parameters(), sharded, pl_module.device)
        pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = batch["input_ids"]
        tokens = ids.numel() * trainer.world_size
        self.tokens_seen += tokens
        now = time.perf_counter()
        rate = tokens / max(now - self._last, 1e-9)  # this step, data loading included
        self._last = now
        pl_module.log("perf/tokens_per_s", rate, on_step=True, on_epoch=False)
        pl_module.log("perf/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False, prog_bar=True)
        if self._flops is not None:
            pl_module.log("perf/mfu", self._flops * rate / self._peak, on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tokens_seen = state_dict["tokens_seen"]


def gradient_norm(parameters, sharded: bool, device: torch.device) -> torch.Tensor:
    """The global L2 norm of the gradients. ``sharded``: each rank holds a disjoint part of them (FSDP1's
    flat shards, FSDP2's DTensor shards), so the squared norms are summed over ranks."""
    squares = [torch.linalg.vector_norm((g.to_local() if isinstance(g, DTensor) else g).float()) ** 2
               for g in (p.grad for p in parameters) if g is not None]
    # a rank may hold no gradient shard at all; its zero still joins the (NCCL: on-device) all-reduce
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if sharded and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total.sqrt()
