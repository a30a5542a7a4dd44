"""Parameter counts of a config's model without allocating it: ``python -m hsa_lightning.params CONFIG``.

Builds the model of the YAML's ``model:`` section on the meta device and prints total and active
(per-token) parameters, so an 8B MoE config can be checked on a laptop.
"""
from __future__ import annotations

import argparse
import sys

import torch
import yaml

from hsa_lightning.errors import ConfigError, PluginError


def lit_module(config_path: str):
    """The HSALitModule of a training YAML's ``model:`` section (plugins built, no model allocated yet)."""
    try:
        with open(config_path) as f:
            spec = (yaml.safe_load(f) or {}).get("model")
    except yaml.YAMLError as e:
        raise ConfigError(f"{config_path}: not readable YAML ({e})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{config_path}: no 'model:' section")
    return module_from_spec(spec)


def module_from_spec(spec: dict):
    """HSALitModule(**spec): validates the config and builds the plugins."""
    from hsa_lightning.lit.module import HSALitModule
    from hsa_lightning.registry import load_plugins

    load_plugins()
    return HSALitModule(**spec)


def count(config_path: str) -> tuple[int, int]:
    return count_module(lit_module(config_path))


def count_module(m) -> tuple[int, int]:
    """(total, active per token) parameters of an HSALitModule's model, built on the meta device."""
    with torch.device("meta"):  # shapes only, no memory
        model = m.build_model()
    return model.num_parameters(), model.num_parameters(active=True)


def describe(total: int, active: int) -> str:
    return f"{total:,} parameters ({_short(total)}), {active:,} active per token ({_short(active)})"


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hsa_lightning.params", description=__doc__)
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args(argv)
    for path in args.configs:
        try:
            total, active = count(path)
        except (ConfigError, PluginError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{path}: {describe(total, active)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
