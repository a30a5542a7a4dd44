"""LengthEvalData: the evaluation grid as a test loader, one sample per batch, generated from the seed.

Cells are (task, length, depth) for the retrieval tasks (depth only for ``depth_tasks``, on the paper's
0, 11, ..., 100% grid) and (perplexity, length) for held-out text. Sample i of a cell is a pure function
of (seed, task, length, depth, i), so a rerun, any number of ranks and any loader workers see the same
samples. The ``LengthEval`` callback scores them (``hsa_lightning/eval/evaluator.py``).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hsa_lightning.data.tasks import TASKS
from hsa_lightning.errors import ConfigError

PAPER_DEPTHS = (0, 11, 22, 33, 44, 56, 67, 78, 89, 100)  # percent, the rows of the paper's Figure 4


@dataclass(frozen=True)
class Cell:
    task: str  # a task name, or "perplexity"
    length: int
    depth: int = -1  # needle depth in percent; -1: drawn per sample

    @property
    def label(self) -> str:
        return f"{self.task} L={self.length:,}" + (f" depth={self.depth}%" if self.depth >= 0 else "")


class _Samples(Dataset):
    def __init__(self, data: "LengthEvalData"):
        self.data = data
        self.items = [(cell, i) for cell in data.cells for i in range(data.samples_in(cell))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            return {"eval_kind": "skip", "input_ids": torch.zeros(1, dtype=torch.int64)}
        cell, i = self.items[index]
        return self.data.sample(cell, i)


class _EvenShards(DistributedSampler):
    """Rank r reads items r, r + world, ...; ranks short of the longest get -1 (a no-op sample), so DDP
    sees equal step counts and nothing is scored twice (the default sampler repeats items instead)."""

    def __iter__(self):
        own = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(own + [-1] * (self.num_samples - len(own)))


def _first(batch: list[dict]) -> dict:
    item = dict(batch[0])
    item["input_ids"] = item["input_ids"][None]
    return item


class LengthEvalData(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: str = "byte",
        haystack: str = "synthetic",
        tasks: Sequence[str] = ("s_niah", "mq_niah", "vt"),
        lengths: Sequence[int] = (1024, 4096, 16384),
        depth_tasks: Sequence[str] = ("s_niah",),
        depths: Sequence[int] = PAPER_DEPTHS,
        samples: int = 20,
        depth_samples: Optional[int] = None,
        ppl_corpus: Optional[str] = None,
        ppl_lengths: Sequence[int] = (),
        ppl_samples: int = 4,
        seed: int = 0,
        num_workers: int = 0,
    ):
        """
        Args:
            tokenizer: ``byte`` or a ``tokenizer.json``: the one the model was trained with.
            haystack: ``synthetic`` (seeded generated prose), a shard folder written by ``prepare``, or text
                files / folders / globs (``.txt``, ``.md``, ``.jsonl``), e.g. ``data/demo/haystack``;
                repeated when a sample is longer.
            tasks: names from ``hsa_lightning/data/tasks.py`` (paper: s_niah, mq_niah, mv_niah, vt, passkey;
                RULER: niah_single_2, niah_multiquery, niah_multivalue, ruler_vt).
            lengths: sample lengths in tokens (any list; e.g. a x4 grid from below the training length).
            depth_tasks: tasks evaluated on the ``depths`` grid (single-needle tasks only).
            depths: needle depths in percent.
            samples: samples per cell.
            depth_samples: samples per cell of the depth grid (default ``samples``); a depth task has one
                cell per depth, so fewer per cell give it as many samples per length as the other tasks.
            ppl_corpus: held-out text (a shard folder, or files / folders / globs) for perplexity and
                last-4K loss.
            ppl_lengths: lengths of those perplexity windows. Window i of every length ends
                i * (corpus tokens // ppl_samples) tokens before the corpus ends, so all lengths score the
                same final tokens with more or less context before them, windows of one length do not
                overlap, and runs with other length lists score the same text.
            ppl_samples: windows per length.
        """
        super().__init__()
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"data tasks={list(tasks)}: unknown {unknown}; choose from {', '.join(TASKS)}")
        bad_depth = [t for t in depth_tasks if t not in tasks]
        if bad_depth:
            raise ConfigError(f"data depth_tasks={list(depth_tasks)}: {bad_depth} not in tasks={list(tasks)}")
        for name, values in (("lengths", lengths), ("ppl_lengths", ppl_lengths)):
            if any(v < 1 for v in values):
                raise ConfigError(f"data {name}={list(values)}: every length must be >= 1")
        if any(not 0 <= d <= 100 for d in depths):
            raise ConfigError(f"data depths={list(depths)}: depths are percentages within [0, 100]")
        for name, value in (("samples", samples), ("depth_samples", depth_samples), ("ppl_samples", ppl_samples)):
            if value is not None and value < 1:
                raise ConfigError(f"data {name}={value} must be >= 1")
        if ppl_lengths and ppl_corpus is None:
            raise ConfigError(f"data ppl_lengths={list(ppl_lengths)} needs a ppl_corpus")
        self.save_hyperparameters()
        self.tasks, self.lengths, self.samples, self.seed = list(tasks), list(lengths), samples, seed
        self.cells = [Cell(t, n, d) for t in tasks for n in lengths
                      for d in (depths if t in depth_tasks else (-1,))]
        self.cells += [Cell("perplexity", n) for n in ppl_lengths]
        self.tokenizer = None
        self.vocab_size = None

    # -- data --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        from hsa_lightning.data.tokenizer import load_tokenizer

        if self.tokenizer is not None:
            return
        h = self.hparams
        self.tokenizer = load_tokenizer(h.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.haystack = self._haystack_tokens()
        for t in self.tasks:  # a too-short length fails now, naming the task, not mid-run
            try:
                TASKS[t](self.tokenizer, self.haystack[:0], min(self.lengths), np.random.default_rng(0))
            except ValueError as e:
                raise ConfigError(f"data lengths: {e}; drop lengths below what the task needs") from None
        self.ppl_stream = None
        if h.ppl_lengths:
            self.ppl_stream = self._corpus_tokens(h.ppl_corpus, separator=True)
            need = h.ppl_samples * max(h.ppl_lengths)
            if len(self.ppl_stream) < need:
                raise ConfigError(
                    f"data ppl_corpus={h.ppl_corpus!r} has {len(self.ppl_stream):,} tokens; ppl_samples={h.ppl_samples} "
                    f"windows of ppl_lengths up to {max(h.ppl_lengths):,} need {need:,}")

    def _haystack_tokens(self) -> np.ndarray:
        if self.hparams.haystack == "synthetic":
            from hsa_lightning.data.synthetic import Haystack

            text = Haystack(self.seed).text(np.random.default_rng([self.seed, 1]), 200_000)
            return np.asarray(self.tokenizer.encode(text), dtype=np.int64)
        return self._corpus_tokens(self.hparams.haystack, separator=False)

    def _corpus_tokens(self, spec: str, separator: bool) -> np.ndarray:
        from pathlib import Path

        from hsa_lightning.data.corpus import find_sources, read_documents
        from hsa_lightning.data.shards import MANIFEST, stream_tokens

        if (Path(spec) / MANIFEST).is_file():  # an MDS shard folder written by `prepare`
            return stream_tokens(spec, self.tokenizer)
        sources = find_sources([spec])
        if not sources:
            raise ConfigError(f"data {spec!r}: no .txt, .md, .rst or .jsonl files found")
        ids: list[int] = []
        for path in sources:
            for doc in read_documents(path):
                ids += self.tokenizer.encode(doc)
                ids += [self.tokenizer.doc_sep] if separator else self.tokenizer.encode(" ")
        return np.asarray(ids, dtype=np.int64)

    def samples_in(self, cell: Cell) -> int:
        if cell.task == "perplexity":
            return self.hparams.ppl_samples
        if cell.depth >= 0 and self.hparams.depth_samples is not None:
            return self.hparams.depth_samples
        return self.samples

    def sample(self, cell: Cell, i: int) -> dict:
        meta = {"task": cell.task, "length": cell.length, "depth": cell.depth, "index": i}
        if cell.task == "perplexity":
            # every length's i-th window ends at the same token, so the last-window loss against length shows
            # what the longer context is worth; the end depends on the corpus only, never on the length list,
            # so evaluations with different lengths compare on the same text
            end = len(self.ppl_stream) - i * (len(self.ppl_stream) // self.hparams.ppl_samples)
            window = self.ppl_stream[end - cell.length:end]
            return {**meta, "eval_kind": "ppl", "input_ids": torch.from_numpy(window.copy())}
        rng = np.random.default_rng([self.seed, zlib.crc32(cell.task.encode()), cell.length, cell.depth + 1, i])
        offset = int(rng.integers(len(self.haystack)))
        hay = np.concatenate([self.haystack[offset:], self.haystack[:offset]])  # a different stretch per sample
        depth = None if cell.depth < 0 else cell.depth / 100
        s = TASKS[cell.task](self.tokenizer, hay, cell.length, rng, depth=depth)
        return {**meta, "eval_kind": "task", "input_ids": torch.from_numpy(s.tokens), "answer_start": s.answer_start,
                "answer_end": s.answer_end, "answers": s.answers, "needle_starts": s.needle_starts,
                "answer_sources": s.answer_sources}

    def test_dataloader(self) -> DataLoader:
        samples = _Samples(self)
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = _EvenShards(samples, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
        return DataLoader(samples, batch_size=1, sampler=sampler, collate_fn=_first,
                          num_workers=self.hparams.num_workers)
