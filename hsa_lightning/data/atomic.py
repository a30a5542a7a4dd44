"""Outputs (folders or single files) that are complete or absent: written under a temporary sibling name,
renamed when done.

A killed or failed run leaves nothing that looks like a finished folder, and an existing output is
replaced only when asked and only once the new one is complete.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hsa_lightning.errors import ConfigError


def refuse_overwrite(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ConfigError(f"output {str(output)!r} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
    """Yields the temporary folder path to write into; it becomes ``output`` when the block succeeds
    and is removed when it fails."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        _replace_folder(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextmanager
def atomic_file(output: Path) -> Iterator[Path]:
    """Yields the temporary sibling path to write; it replaces ``output`` when the block succeeds and is
    removed when it fails (a sibling, so the rename never crosses file systems)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        yield partial
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


def _replace_folder(partial: Path, output: Path) -> None:
    """Move the finished folder into place; an existing one is removed only after the move."""
    if not output.exists():
        partial.rename(output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    output.rename(old)
    try:
        partial.rename(output)
    except BaseException:
        old.rename(output)  # never lose the previous folder
        raise
    shutil.rmtree(old, ignore_errors=True)
