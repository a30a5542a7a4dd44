"""Curriculum: a callback that runs a list of curriculum stages at optimizer-step boundaries.

Each stage's settings override the run's configuration (the model config's window and top-k, the data
module's sequence length and synthetic share, a learning-rate multiplier of 1) while it is active;
what a stage leaves unset returns to the configuration. The stage follows from the global step, so a
resumed run re-enters the stage it was in; the stage index is also saved in checkpoints.
"""
from __future__ import annotations

from typing import Optional, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from hsa_lightning.curriculum import CurriculumStage
from hsa_lightning.errors import ConfigError
from hsa_lightning.registry import build_plugin

StageArg = Union[str, CurriculumStage, dict]


class Curriculum(L.Callback):
    def __init__(self, stages: list[StageArg]):
        """
        Args:
            stages: curriculum stages in order (names, or ``{class_path, init_args}``); every stage but
                the last needs ``steps``.
        """
        self.stages = [build_plugin("curriculum", s) for s in stages]
        if not self.stages:
            raise ConfigError("curriculum stages=[]: give at least one stage")
        for i, stage in enumerate(self.stages[:-1]):
            if stage.steps is None:
                raise ConfigError(f"curriculum stage {i} ({stage.name}) needs steps: only the last stage may run to the end")
        self.active: Optional[int] = None
        self._baseline: dict = {}

    def stage_at(self, step: int) -> tuple[int, float]:
        """(index of the stage that owns optimizer step ``step``, progress through it in [0, 1])."""
        start = 0
        for i, stage in enumerate(self.stages):
            if stage.steps is None or step < start + stage.steps or i == len(self.stages) - 1:
                progress = 0.0 if stage.steps is None else min((step - start) / stage.steps, 1.0)
                return i, progress
            start += stage.steps
        raise AssertionError("unreachable")

    # -- hooks ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        dm = trainer.datamodule
        needs = [s for s in self.stages if s.seq_len is not None or s.synthetic_share is not None]
        settable = getattr(type(dm), "seq_len", None)
        if needs and not (isinstance(settable, property) and settable.fset is not None):
            raise ConfigError(f"curriculum stage {needs[0].name} sets seq_len or synthetic_share, but data module "
                              f"{type(dm).__name__} cannot change them (use StreamingDataModule)")
        chunk = module.config.chunk_size
        for s in self.stages:
            if s.seq_len is not None and s.seq_len % chunk:
                raise ConfigError(f"curriculum stage {s.name} seq_len={s.seq_len} is not a multiple of model "
                                  f"config.chunk_size={chunk}")
        self._baseline = {"seq_len": getattr(dm, "seq_len", None),
                          "synthetic_share": getattr(dm, "synthetic_share", None)}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._enter(trainer, module, trainer.global_step, force=True)  # also after a resume

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        stage = self.stages[self.active]
        new = stage.transform(dict(batch))
        batch.clear()  # in place: Lightning hands this same dict to training_step
        batch.update(new)
        module.log("curriculum/stage", float(self.active), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._enter(trainer, module, trainer.global_step)  # settings for the next step

    def state_dict(self) -> dict:
        return {"stage": self.active}

    def load_state_dict(self, state: dict) -> None:
        self.active = state.get("stage")

    # -- applying a stage -----------------------------------------------------------------------
    def _enter(self, trainer: L.Trainer, module: L.LightningModule, step: int, force: bool = False) -> None:
        index, progress = self.stage_at(step)
        stage = self.stages[index]
        module.lr_scale = stage.lr_scale_at(progress)
        if index == self.active and not force:
            return
        self.active = index
        dm = trainer.datamodule
        if self._baseline.get("seq_len") is not None:
            dm.seq_len = stage.seq_len or self._baseline["seq_len"]
        if self._baseline.get("synthetic_share") is not None:
            share = stage.synthetic_share
            dm.synthetic_share = self._baseline["synthetic_share"] if share is None else share
        module.model.set_window(stage.window)
        module.model.set_top_k(stage.top_k)
        rank_zero_info(f"curriculum: step {step}, stage {index} ({stage.name})"
                       + (f" for {stage.steps} steps" if stage.steps else " to the end"))
