"""TrainingProgressBar: Lightning's rich progress bar, plus tokens seen and the whole run's ETA.

    trainer:
      callbacks: [{class_path: TrainingProgressBar}]

``tokens`` formats TrainingMonitor's ``perf/tokens_seen`` (12.6M); ``eta`` is the time to ``max_steps`` at the
mean step time since this run (or resume) started, validation included.
"""
from __future__ import annotations

import time

from lightning.pytorch.callbacks import RichProgressBar


class TrainingProgressBar(RichProgressBar):
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._started, self._first_step = time.perf_counter(), trainer.global_step

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's "Epoch 0/-2" when only max_steps bounds the run
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 1:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        tokens = items.pop("perf/tokens_seen", None)
        if tokens is not None:
            items["tokens"] = _short(float(tokens))
        done = trainer.global_step - getattr(self, "_first_step", trainer.global_step)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if done > 0 and total != float("inf"):
            remaining = (time.perf_counter() - self._started) / done * max(total - trainer.global_step, 0)
            items["eta"] = _clock(remaining)
        return items


def _short(n: float) -> str:
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
