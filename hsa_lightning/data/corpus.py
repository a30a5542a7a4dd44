"""Raw-text inputs: which files a corpus is made of, and the documents inside them.

A ``.jsonl`` file holds one document per line (the ``text_field`` of each JSON object); any other
file (``.txt``, ``.md``, ``.rst``, ...) is one document. Inputs may be files, folders (searched
recursively for ``extensions``) or glob patterns.
"""
from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

from hsa_lightning.errors import ConfigError

TEXT_EXTENSIONS = (".txt", ".jsonl", ".md", ".rst")


def find_sources(inputs: Sequence[str], extensions: Sequence[str] = TEXT_EXTENSIONS) -> list[Path]:
    """Files named by ``inputs``, sorted within each input, each file once; errors name the input."""
    if not inputs:
        raise ConfigError("no input given: name .txt/.jsonl files, folders or glob patterns")
    files: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if any(ch in item for ch in "*?["):
            found = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not found:
                raise ConfigError(f"input {item!r}: the glob pattern matches no file")
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in extensions)
            if not found:
                raise ConfigError(f"input {item!r}: the folder holds no file ending in {', '.join(extensions)}")
        elif p.is_file():
            found = [p]
        else:
            raise ConfigError(f"input {item!r} does not exist")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    return files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file; unreadable or malformed files raise ConfigError naming file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix != ".jsonl":
                yield f.read()
                return
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ConfigError(f"{path}:{n}: no string field {text_field!r} (set --text-field)")
                yield record[text_field]
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
