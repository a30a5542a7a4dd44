"""HSALitModule: trains and evaluates HSALM; plugins arrive as names or instances from LightningCLI."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from hsa_lightning.errors import ConfigError
from hsa_lightning.lit.parallel import DTYPES, ParallelConfig, materialize, prepare
from hsa_lightning.model.attention_backend import AttentionBackend
from hsa_lightning.model.config import ModelConfig
from hsa_lightning.model.ffn import FFN
from hsa_lightning.model.hsalm import HSALM
from hsa_lightning.model.layout import LayerLayout, check_plan
from hsa_lightning.model.position import PositionEncoding
from hsa_lightning.registry import build_plugin

_PRECISION_DTYPE = {"64": torch.float64, "bf16": torch.bfloat16, "16": torch.float16}


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then constant or cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim min_lr_ratio={self.min_lr_ratio} must be within [0, 1]")


# A plugin argument is a registry name ("Flash"), an instance jsonargparse built from
# {class_path, init_args}, or such a dict when jsonargparse could not resolve the name (we then
# report the unknown name with the known ones).
AttentionArg = Union[str, AttentionBackend, dict]
LayoutArg = Union[str, LayerLayout, dict]
PositionArg = Union[str, PositionEncoding, dict]
FFNArg = Union[str, FFN, dict]


class HSALitModule(L.LightningModule):
    def __init__(
        self,
        config: Optional[ModelConfig] = None,
        attention: AttentionArg = "HSAReference",
        layout: LayoutArg = "UltraLong",
        position: PositionArg = "RoPE",
        ffn: FFNArg = "SwiGLU",
        optim: Optional[OptimConfig] = None,
        parallel: Optional[ParallelConfig] = None,
        init_weights: Optional[str] = None,
    ):
        """``parallel``: activation checkpointing, compilation and FSDP2 settings (``lit/parallel.py``).
        ``init_weights``: a checkpoint (a file, or a sharded checkpoint's folder) whose model weights (only)
        start this run, e.g. the previous curriculum stage's last checkpoint when a stage runs as its own
        fit on a new data mix."""
        super().__init__()
        self.save_hyperparameters()
        self.config = _as(ModelConfig, config)
        self.optim = _as(OptimConfig, optim)
        self.parallel = _as(ParallelConfig, parallel)
        self.attention = build_plugin("attention", attention)
        self.layout = build_plugin("layout", layout)
        self.position = build_plugin("position", position)
        self.ffn = build_plugin("ffn", ffn)
        # Everything that can be checked without a device is checked now, before any model exists.
        self.attention.check_static(self.config)
        check_plan(self.layout.plan(self.config.n_layers), self.config.n_layers, type(self.layout).__name__)
        self.model: Optional[HSALM] = None
        self.lr_scale = 1.0  # a curriculum stage's learning-rate multiplier
        self._metrics: dict[str, MeanMetric] = {}  # kept out of the module tree (meta init would corrupt them)

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:  # idempotent: Lightning may call it more than once
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self.attention.check_runtime(device, self._compute_dtype())
        mesh = self._fsdp2_mesh()
        if mesh is None:
            self.model = prepare(self.build_model(), self.parallel)
        else:  # FSDP2: build on the meta device, shard, then allocate each rank's shards only
            with torch.device("meta"):
                model = self.build_model()
            self.model = prepare(model, self.parallel, mesh)
            materialize(self.model, device)
        if self.hparams.init_weights:
            self.load_weights(self.hparams.init_weights)
        total, active = self.model.num_parameters(), self.model.num_parameters(active=True)
        rank_zero_info(f"HSALM: {total / 1e6:,.1f}M parameters, {active / 1e6:,.1f}M active per token")

    def build_model(self) -> HSALM:
        """A fresh HSALM of this module's config and plugins (not prepared, not kept)."""
        return HSALM(self.config, self.attention, self.layout, self.position, self.ffn)

    def _fsdp2_mesh(self):
        """The data-parallel device mesh under ModelParallelStrategy (FSDP2), else None."""
        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return None
        tensor_parallel = self.device_mesh["tensor_parallel"].size()
        if tensor_parallel > 1:
            raise ConfigError(
                f"trainer strategy ModelParallelStrategy has tensor_parallel_size={tensor_parallel}, but HSALM has "
                f"no tensor-parallel plan; use strategy FSDP2Strategy (every device a data-parallel rank)")
        return self.device_mesh["data_parallel"]

    def load_weights(self, path: str) -> None:
        """The model weights of a Lightning checkpoint: a file, or the folder of a sharded (DCP) one.
        Works for a sharded model too: each rank keeps its shards of the full weights."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             set_model_state_dict)

        try:
            if os.path.isdir(path):
                import torch.distributed.checkpoint as dcp

                # DCP reads into tensors shaped like ours; Lightning stores the module under "state_dict"
                own = get_model_state_dict(self.model)
                state = {"state_dict": {f"model.{k}": v for k, v in own.items()}}
                dcp.load(state, checkpoint_id=path)
                weights, full = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}, False
            else:
                state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
                weights, full = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}, True
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            raise ConfigError(f"model init_weights={path!r} is not a readable Lightning checkpoint "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        try:
            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=full, strict=True))
        except RuntimeError as e:  # missing, unexpected or differently shaped weights
            lines = str(e).splitlines()
            raise ConfigError(f"model init_weights={path!r} does not match this model: "
                              f"{(lines[1] if len(lines) > 1 else lines[0]).strip()}") from None

    def _compute_dtype(self) -> torch.dtype:
        if self._trainer is None:
            return torch.float32
        if isinstance(self.trainer.strategy, ModelParallelStrategy) and self.parallel.param_dtype != "fp32":
            return DTYPES[self.parallel.param_dtype]  # FSDP2 casts the gathered parameters
        return _PRECISION_DTYPE.get(str(self.trainer.precision).split("-")[0], torch.float32)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        vocab = getattr(dm, "vocab_size", None)
        if vocab is not None and vocab > self.config.vocab_size:
            raise ConfigError(
                f"the data's tokenizer has vocab_size={vocab} but model config.vocab_size="
                f"{self.config.vocab_size}; the embedding must cover every token id"
            )
        if getattr(dm, "mask_documents", False) and not self.attention.masks_documents:
            raise ConfigError(
                f"data mask_documents=true needs an attention backend that masks documents; "
                f"{type(self.attention).__name__} does not (HSAReference, HSATriton and Flash do)"
            )
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len % self.config.chunk_size:
            raise ConfigError(
                f"data seq_len={seq_len} is not a multiple of model config.chunk_size={self.config.chunk_size}; "
                f"packed training blocks must be chunk-aligned"
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    # -- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, n = self.model.loss(batch["input_ids"], batch["labels"], batch.get("doc_start"))
        loss = nll / n.clamp_min(1)
        # the mean over ranks (one scalar all-reduce), so every strategy logs the same curve
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True)
        routed = self.model.routed_ffns()
        for i, ffn in enumerate(routed):
            aux = ffn.take_aux_loss()
            if aux is not None:
                self.log(f"moe/{i}/aux_loss", aux, on_step=True, on_epoch=False)
                loss = loss + aux
            for key, value in ffn.routing_stats().items():
                self.log(f"moe/{i}/{key}", value, on_step=True, on_epoch=False)
        return loss

    def on_train_start(self) -> None:
        self._stepped_at = self.trainer.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # once per optimizer step (global_step moves only when the optimizer stepped)
        if self.trainer.global_step != self._stepped_at:
            self._stepped_at = self.trainer.global_step
            for ffn in self.model.routed_ffns():
                ffn.after_optimizer_step()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if "eval_kind" in batch:  # a LengthEvalData sample: the LengthEval callback scores it
            return
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        nll, n = self.model.loss(batch["input_ids"], batch["labels"], batch.get("doc_start"))
        self._metric(stage).update(nll / n.clamp_min(1), weight=n)

    def _metric(self, stage: str) -> MeanMetric:
        if stage not in self._metrics:
            self._metrics[stage] = MeanMetric()
        return self._metrics[stage].to(self.device)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        if stage not in self._metrics:  # no language-model batches (a LengthEvalData run)
            return
        metric = self._metric(stage)
        loss = metric.compute()  # token-weighted mean NLL, synced across ranks by torchmetrics
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", torch.exp(loss))

    # -- optimisation --------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(self.trainer.strategy, FSDPStrategy):
            # FSDP1's shards need the root wrapper's own clipping (Lightning's raises for FSDPStrategy)
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)  # FSDP2: DTensor-aware

    def configure_optimizers(self):
        o = self.optim
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps * self.lr_scale
            if o.schedule == "constant":
                return self.lr_scale
            progress = min((step - o.warmup_steps) / max(total - o.warmup_steps, 1), 1.0)
            return (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))) * self.lr_scale

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _as(cls, value):
    """A dataclass from None (defaults), a dict (a checkpoint's hparams) or an instance."""
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls(**value)
