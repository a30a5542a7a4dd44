"""The command line: load entry-point plugins, then LightningCLI over HSALitModule and any DataModule."""
from __future__ import annotations

import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from hsa_lightning.errors import ConfigError, PluginError
from hsa_lightning.eval.datamodule import LengthEvalData  # noqa: F401  (found by short name)
from hsa_lightning.eval.evaluator import LengthEval  # noqa: F401
from hsa_lightning.lit.curriculum_callback import Curriculum  # noqa: F401  (found by short name)
from hsa_lightning.lit.module import HSALitModule
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


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["generate"]:  # not a Trainer method, so not a LightningCLI subcommand
            from hsa_lightning.inference.cli import main as generate

            generate(argv[1:])
        else:
            HSALightningCLI(args=args)
    except Exception as exc:
        cause = _user_error(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def _user_error(exc: BaseException) -> BaseException | None:
    """Our own configuration error, even when jsonargparse wrapped it while instantiating."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (ConfigError, PluginError)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
