"""One checkpoint file from a sharded (FSDP2, DCP) checkpoint folder, for single-device use:
``python -m hsa_lightning.lit.consolidate RUN/checkpoints/step=N.ckpt [-o OUT.ckpt]``.

The file holds the full model weights and the folder's metadata (hyperparameters, loop and callback
states), so ``cli.py generate``, ``validate``/``test --ckpt_path`` and ``init_weights`` read it like any
single-device checkpoint. Optimizer states are left out: resume training from the folder itself, on the
same world size. Lightning's own ``consolidate_checkpoint`` reads only FSDP1 folders.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from hsa_lightning.errors import ConfigError


def consolidate(folder: Path, output: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (folder / ".metadata").is_file() or not (folder / "meta.pt").is_file():
        raise ConfigError(f"checkpoint {str(folder)!r} is not a sharded checkpoint folder (.metadata and meta.pt)")
    if output.exists():
        raise ConfigError(f"output {str(output)!r} already exists; remove it or choose another -o")
    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    if not any(k.startswith("state_dict.") for k in keys):
        raise ConfigError(f"checkpoint {str(folder)!r} holds no model weights ('state_dict')")
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        dcp_to_torch_save(str(folder), str(partial))  # every tensor, full, in one process
        state = torch.load(partial, weights_only=False)
        checkpoint = torch.load(folder / "meta.pt", weights_only=False)
        checkpoint["state_dict"] = state["state_dict"]
        torch.save(checkpoint, partial)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hsa_lightning.lit.consolidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a sharded checkpoint folder")
    parser.add_argument("-o", "--output", type=Path, help="default: CHECKPOINT.consolidated.ckpt beside it")
    args = parser.parse_args(argv)
    output = args.output or args.checkpoint.with_name(f"{args.checkpoint.name}.consolidated.ckpt")
    try:
        consolidate(args.checkpoint, output)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output} (model weights and run metadata; no optimizer state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
