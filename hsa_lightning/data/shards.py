"""Tokenised MDS shards: text -> one packed token stream -> fixed blocks, with a manifest.

Documents are tokenised in input order and joined, each followed by ``doc_sep``. The stream is cut
into samples of ``block_len + 1`` tokens (inputs plus the label of the last one; consecutive samples
share that one token), so every sample holds the same number of tokens: mixing proportions over
samples are proportions over tokens, and mosaicml-streaming's sample counter is an exact resume
point. The last sample is filled up with ``pad`` (its labels are masked). ``block_len`` is the
longest sequence a run can train on; the DataModule cuts blocks into shorter sequences.

The folder is written under a temporary name and renamed when complete, so a killed run leaves
nothing that looks like a shard folder. ``manifest.json`` records the tokenizer, the counts and the
sources (path, size, sha256).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from hsa_lightning.data.atomic import atomic_folder, refuse_overwrite
from hsa_lightning.data.corpus import TEXT_EXTENSIONS, find_sources, read_documents, sha256_file
from hsa_lightning.data.tokenizer import Tokenizer
from hsa_lightning.errors import ConfigError

FORMAT = "hsa-lightning-mds/1"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_shards(
    inputs: Sequence[str],
    output: str | Path,
    tokenizer: Tokenizer,
    block_len: int = 8192,
    text_field: str = "text",
    overwrite: bool = False,
    extensions: Sequence[str] = TEXT_EXTENSIONS,
    size_limit: str = "64mb",
    progress: bool = True,
) -> dict:
    """Tokenise ``inputs`` into an MDS shard folder at ``output``; returns the manifest."""
    from streaming import MDSWriter
    from tqdm import tqdm

    output = Path(output)
    if block_len < 1:
        raise ConfigError(f"block_len={block_len} (--block-len) must be >= 1")
    refuse_overwrite(output, overwrite)
    files = find_sources(inputs, extensions)
    sources = [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]

    dtype = token_dtype(tokenizer.vocab_size)
    counts = {"documents": 0, "tokens": 0, "samples": 0, "padding": 0}
    buffer: list[int] = []
    started = time.time()
    with atomic_folder(output) as partial:
        with MDSWriter(out=str(partial), columns={"tokens": f"ndarray:{dtype}"}, compression=None,
                       size_limit=size_limit, progress_bar=False) as writer:

            def emit(block: list[int]) -> None:
                writer.write({"tokens": np.asarray(block, dtype=dtype)})
                counts["samples"] += 1

            bar = tqdm(total=sum(s["bytes"] for s in sources), unit="B", unit_scale=True, desc="tokenising",
                       disable=not progress, file=sys.stderr)
            for source, path in zip(sources, files):
                docs = tokens = shown = 0
                for texts in _batches(read_documents(path, text_field), 256):
                    for text, ids in zip(texts, tokenizer.encode_batch(texts)):  # HF tokenizers use all cores
                        buffer += ids
                        buffer.append(tokenizer.doc_sep)
                        docs, tokens = docs + 1, tokens + len(ids) + 1
                        while len(buffer) >= block_len + 1:
                            emit(buffer[: block_len + 1])
                            del buffer[:block_len]  # the last token is the next sample's first input
                        if path.suffix == ".jsonl":  # per document; exact per file below
                            step = min(len(text.encode("utf-8", errors="replace")), source["bytes"] - shown)
                            bar.update(step)
                            shown += step
                bar.update(source["bytes"] - shown)
                bar.set_postfix(tokens=f"{counts['tokens'] + tokens:,}", docs=counts["documents"] + docs)
                source.update(documents=docs, tokens=tokens)
                counts["documents"] += docs
                counts["tokens"] += tokens
            bar.close()
            if counts["tokens"] == counts["documents"]:  # only separators: every document was empty
                raise ConfigError(f"the corpus {list(inputs)} holds no text: {counts['documents']} documents, all empty")
            if len(buffer) > 1 or counts["samples"] == 0:
                counts["padding"] = block_len + 1 - len(buffer)
                emit(buffer + [tokenizer.pad] * counts["padding"])
        manifest = {
            "format": FORMAT,
            "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                          "vocab_size": tokenizer.vocab_size, "doc_sep": tokenizer.doc_sep, "pad": tokenizer.pad},
            "block_len": block_len,
            "dtype": dtype,
            **counts,
            "sources": sources,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if progress:
        took = time.time() - started
        print(f"wrote {counts['samples']:,} blocks of {block_len} tokens ({counts['tokens']:,} tokens, "
              f"{counts['documents']:,} documents) to {output} in {took:.1f} s", file=sys.stderr)
    return manifest


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a complete shard folder; ConfigError if the folder is missing or incomplete."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"shard folder {str(folder)!r} does not exist (write one with "
                          f"`python -m hsa_lightning.data prepare`)")
    path = folder / MANIFEST
    if not path.is_file() or not (folder / "index.json").is_file():
        raise ConfigError(f"shard folder {str(folder)!r} has no {MANIFEST} and index.json: it was not written by "
                          f"`python -m hsa_lightning.data prepare`, or that run did not finish")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"shard folder {str(folder)!r}: {MANIFEST} is not valid JSON ({e.msg})") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"shard folder {str(folder)!r} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def stream_tokens(folder: str | Path, tokenizer) -> np.ndarray:
    """The whole token stream of a shard folder (blocks rejoined where they overlap, padding dropped),
    for evaluation haystacks and held-out perplexity; refused when written with another tokenizer."""
    from streaming import LocalDataset

    manifest = read_manifest(folder)
    written = manifest["tokenizer"]
    if written["fingerprint"] != tokenizer.fingerprint:
        raise ConfigError(f"shard folder {str(folder)!r} was written with tokenizer {written['name']!r} "
                          f"({written['fingerprint']}) but the evaluation tokenizer is {tokenizer.fingerprint}")
    data = LocalDataset(local=str(folder))
    blocks = [np.asarray(data[i]["tokens"], dtype=np.int64) for i in range(len(data))]
    stream = np.concatenate([blocks[0]] + [b[1:] for b in blocks[1:]]) if blocks else np.zeros(0, np.int64)
    return stream[stream != tokenizer.pad]
