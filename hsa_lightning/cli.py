"""The command line: load entry-point plugins, then LightningCLI over HSALitModule and any DataModule."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys

import yaml

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from hsa_lightning.errors import ConfigError, PluginError
from hsa_lightning.eval.datamodule import LengthEvalData  # noqa: F401  (found by short name)
from hsa_lightning.eval.evaluator import LengthEval  # noqa: F401
from hsa_lightning.lit.curriculum_callback import Curriculum  # noqa: F401  (found by short name)
from hsa_lightning.lit.fsdp2_strategy import FSDP2Strategy  # noqa: F401  (found by short name)
from hsa_lightning.lit.module import HSALitModule
from hsa_lightning.lit.progress import TrainingProgressBar  # noqa: F401
from hsa_lightning.lit.streaming_datamodule import StreamingDataModule  # noqa: F401  (found by short name)
from hsa_lightning.lit.synthetic_datamodule import SyntheticDataModule  # noqa: F401
from hsa_lightning.lit.training_monitor import TrainingMonitor  # noqa: F401
from hsa_lightning.registry import load_plugins


class HSALightningCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        load_plugins()  # before parsing, so short plugin names resolve in YAML and on the command line
        set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config field docs in --help
        super().__init__(
            HSALitModule,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("logger") in (None, True) and "logger" not in kwargs:  # the run config names none
            kwargs["logger"] = default_loggers(trainer.get("default_root_dir") or os.getcwd())
        if trainer.get("enable_progress_bar") is False:  # silences the run config's progress bar too
            kwargs["callbacks"] = [c for c in trainer.get("callbacks") or [] if not isinstance(c, ProgressBar)]
        return super().instantiate_trainer(**kwargs)


def default_loggers(save_dir: str) -> list:
    """CSV always; TensorBoard beside it, in the same version folder, when it is installed."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv = CSVLogger(save_dir)
    if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        return [csv]
    return [csv, TensorBoardLogger(save_dir, version=csv.version)]


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["generate"]:  # not a Trainer method, so not a LightningCLI subcommand
            from hsa_lightning.inference.cli import main as generate

            generate(argv[1:])
        elif "--print_config" in argv:
            print_config(args)
        else:
            HSALightningCLI(args=args)
    except Exception as exc:
        cause = _user_error(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def print_config(args) -> None:
    """jsonargparse's resolved config, then the model's parameter counts as a closing YAML comment (the
    output still feeds back through --config)."""
    from hsa_lightning.params import count_module, describe, module_from_spec

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            HSALightningCLI(args=args)
    except SystemExit as done:
        sys.stdout.write(out.getvalue())
        if done.code not in (0, None):
            raise
    spec = (yaml.safe_load(out.getvalue()) or {}).get("model")
    if isinstance(spec, dict):
        print(f"# model: {describe(*count_module(module_from_spec(spec)))}")


def _user_error(exc: BaseException) -> BaseException | None:
    """Our own configuration error, even when jsonargparse wrapped it while instantiating."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (ConfigError, PluginError)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
