"""StreamingDataModule: tokenised MDS shards (local or remote) as constant-token training batches.

Shards hold fixed blocks of ``block_len + 1`` tokens (``hsa_lightning.data.shards``). A training batch
is ``tokens_per_batch // block_len`` blocks, cut into sequences of the current ``seq_len`` (which must
divide ``block_len``), so the number of tokens per step stays constant when a curriculum changes the
sequence length. Several streams mix with proportions (over blocks, hence over tokens). A share of
the sequences is replaced by synthetic retrieval tasks (RULER format, needles in the sequence's own
text), chosen by a seed and the block's id, so it is the same after a resume. With
``mask_documents`` each batch also carries ``doc_start`` (the first position of every token's
document) and attention and retrieval stay inside documents.

Resume: the loader reports as its state the blocks the *trainer consumed* (counted when a batch is
transferred), not the ones the prefetching loader already yielded, so a mid-epoch checkpoint resumes
with exactly the next batch, on one process or many.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import lightning as L
import numpy as np
import torch

from hsa_lightning.data.shards import MANIFEST, read_manifest
from hsa_lightning.data.tasks import TASKS
from hsa_lightning.data.tokenizer import load_tokenizer
from hsa_lightning.errors import ConfigError


@dataclass
class StreamSpec:
    """One shard folder: ``local`` (a folder, or the cache for ``remote``), any remote streaming
    supports (s3://, gs://, oci://, ...), and its share of the mix (``None``: by size)."""

    local: str
    remote: Optional[str] = None
    proportion: Optional[float] = None


Streams = Union[str, list[StreamSpec]]


class StreamingDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: Streams,
        val: Optional[Streams] = None,
        seq_len: int = 4096,
        tokens_per_batch: int = 32768,
        tokenizer: str = "byte",
        synthetic_share: float = 0.01,
        synthetic_tasks: Sequence[str] = ("s_niah", "mq_niah", "vt"),
        mask_documents: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 2,
    ):
        """
        Args:
            train: a shard folder, or a list of streams ``{local, remote, proportion}`` to mix.
            val: the same for validation (read in order, no synthetic samples); none: no validation.
            seq_len: tokens per training sequence; must divide the shards' ``block_len``.
            tokens_per_batch: tokens per step on each device; a multiple of ``block_len``.
            tokenizer: ``byte`` or a ``tokenizer.json``; must be the one the shards were written with.
            synthetic_share: share of training sequences replaced by a synthetic retrieval task.
            synthetic_tasks: which tasks, drawn uniformly: the paper's token-space ``s_niah``, ``mq_niah``,
                ``mv_niah``, ``vt``, ``passkey`` or RULER's text ``niah_single_2``, ``niah_multiquery``,
                ``niah_multivalue``, ``ruler_vt`` (``hsa_lightning/data/tasks.py``).
            mask_documents: keep attention and retrieval inside documents (batches carry ``doc_start``).
        """
        super().__init__()
        self.save_hyperparameters()
        self.train_streams = _as_streams(train, "train")
        self.val_streams = _as_streams(val, "val") if val is not None else []
        if seq_len < 1:
            raise ConfigError(f"data seq_len={seq_len} must be >= 1")
        if tokens_per_batch < 1 or tokens_per_batch % seq_len:
            raise ConfigError(f"data tokens_per_batch={tokens_per_batch} must be a positive multiple of "
                              f"seq_len={seq_len}")
        if not 0.0 <= synthetic_share <= 1.0:
            raise ConfigError(f"data synthetic_share={synthetic_share} must be within [0, 1]")
        unknown = [t for t in synthetic_tasks if t not in TASKS]
        if unknown or not synthetic_tasks:
            raise ConfigError(f"data synthetic_tasks={list(synthetic_tasks)}: choose from {', '.join(TASKS)}")
        if num_workers < 0:
            raise ConfigError(f"data num_workers={num_workers} must be >= 0")
        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.tokens_per_batch, self._synthetic_share = tokens_per_batch, synthetic_share
        self.synthetic_tasks = list(synthetic_tasks)
        self.mask_documents = mask_documents
        self.block_len: Optional[int] = None
        self._seq_len = seq_len
        self._train_loader = None
        self._datasets: dict[str, object] = {}

    # -- shape ----------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self._seq_len

    @seq_len.setter
    def seq_len(self, value: int) -> None:
        """A curriculum may change the sequence length between steps; tokens per batch stay fixed."""
        if value < 1 or self.tokens_per_batch % value:
            raise ConfigError(f"data seq_len={value} must divide tokens_per_batch={self.tokens_per_batch}")
        if self.block_len is not None:
            _check_shapes(value, self.tokens_per_batch, self.block_len)
        old, self._seq_len = self._seq_len, value
        if self.synthetic_share > 0:
            try:
                self._check_tasks_fit()
            except ConfigError:
                self._seq_len = old
                raise

    @property
    def synthetic_share(self) -> float:
        return self._synthetic_share

    @synthetic_share.setter
    def synthetic_share(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"data synthetic_share={value} must be within [0, 1]")
        if value > 0:
            self._check_tasks_fit()
        self._synthetic_share = value

    @property
    def blocks_per_batch(self) -> int:
        return self.tokens_per_batch // self.block_len

    @property
    def batch_size(self) -> int:
        """Sequences per batch at the current ``seq_len``."""
        return self.tokens_per_batch // self.seq_len

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        manifests = [self._manifest(s) for s in self.train_streams + self.val_streams]
        block_lens = {m["block_len"] for m in manifests}
        if len(block_lens) > 1:
            folders = [s.local for s in self.train_streams + self.val_streams]
            raise ConfigError(f"data streams {folders} have different block_len {sorted(block_lens)}; "
                              f"write them with the same --block-len")
        self.block_len = block_lens.pop()
        _check_shapes(self.seq_len, self.tokens_per_batch, self.block_len)
        if self.synthetic_share > 0:
            self._check_tasks_fit()
        if self.trainer is not None:
            self._prepare_streaming_env()

    def _manifest(self, stream: StreamSpec) -> dict:
        local = Path(stream.local)
        if stream.remote is not None:  # the manifest travels beside streaming's index
            from streaming.base.storage.download import CloudDownloader

            for name in (MANIFEST, "index.json"):
                try:
                    CloudDownloader.direct_download(f"{stream.remote.rstrip('/')}/{name}", str(local / name), 60)
                except Exception as e:  # each storage client raises its own errors
                    raise ConfigError(f"cannot fetch {name} of remote stream {stream.remote!r}: {e}") from e
        manifest = read_manifest(local)
        written = manifest["tokenizer"]
        if written["fingerprint"] != self.tokenizer.fingerprint:
            raise ConfigError(
                f"shard folder {stream.local!r} was written with tokenizer {written['name']!r} "
                f"({written['fingerprint']}, vocab_size={written['vocab_size']}) but data tokenizer="
                f"{self.hparams.tokenizer!r} is {self.tokenizer.fingerprint}; re-run prepare with this tokenizer "
                f"or set data.tokenizer to the shards' one"
            )
        return manifest

    def _check_tasks_fit(self) -> None:
        empty = np.zeros(0, dtype=np.int64)
        for name in self.synthetic_tasks:
            try:
                TASKS[name](self.tokenizer, empty, self.seq_len + 1, np.random.default_rng(0))
            except ValueError as e:
                raise ConfigError(f"data seq_len={self.seq_len} is too short for synthetic task {name!r}: {e}; "
                                  f"use a longer seq_len or synthetic_share: 0") from None

    def _prepare_streaming_env(self) -> None:
        """mosaicml-streaming reads its world from RANK / LOCAL_WORLD_SIZE, which Lightning's own
        launcher does not set (torchrun does); stale shared memory of our cache folders is removed."""
        trainer = self.trainer
        os.environ.setdefault("RANK", str(trainer.global_rank))
        os.environ.setdefault("WORLD_SIZE", str(trainer.world_size))
        os.environ.setdefault("LOCAL_RANK", str(trainer.local_rank))
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(trainer.num_devices))
        if not self._datasets and trainer.local_rank == 0:
            _remove_stale_shared_memory([os.path.abspath(s.local) for s in self.train_streams + self.val_streams])
        trainer.strategy.barrier("hsa_streaming_setup")

    # -- loaders --------------------------------------------------------------------------------
    def _dataset(self, split: str):
        if split not in self._datasets:  # once per process: streaming forbids re-registering a folder
            streams = self.train_streams if split == "train" else self.val_streams
            self._datasets[split] = _make_dataset(
                streams, batch_size=self.blocks_per_batch,
                shuffle=self.hparams.shuffle and split == "train", seed=self.hparams.seed,
            )
        return self._datasets[split]

    def _loader(self, split: str):
        from hsa_lightning.data.streaming_dataset import ConsumptionLoader

        return ConsumptionLoader(self._dataset(split), batch_size=self.blocks_per_batch,
                                 num_workers=self.hparams.num_workers, collate_fn=_collate,
                                 drop_last=split == "train", persistent_workers=False)

    def train_dataloader(self):
        self._train_loader = self._loader("train")
        return self._train_loader

    def val_dataloader(self):
        return self._loader("val") if self.val_streams else []

    # -- batches --------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        training = self.trainer is not None and self.trainer.training
        if training and self._train_loader is not None:
            self._train_loader.consumed += batch["tokens"].shape[0]
        return self.make_batch(batch["tokens"], batch["sample_ids"], inject=training)

    def make_batch(self, tokens: torch.Tensor, sample_ids: torch.Tensor, inject: bool = True) -> dict:
        """Blocks (n, block_len + 1) -> ``input_ids``/``labels`` (n * block_len / seq_len, seq_len); pad labels -100."""
        seqs, piece_ids = cut_blocks(tokens, sample_ids, self.seq_len)
        if inject and self.synthetic_share > 0:
            seqs, _ = inject_tasks(seqs, piece_ids, self.tokenizer, self.synthetic_share, self.synthetic_tasks,
                                   self.hparams.seed)
        labels = seqs[:, 1:].clone()
        labels[labels == self.tokenizer.pad] = -100
        batch = {"input_ids": seqs[:, :-1].contiguous(), "labels": labels}
        if self.mask_documents:
            batch["doc_start"] = document_starts(batch["input_ids"], self.tokenizer.doc_sep)
        return batch


# -- pieces, module level so tests use them directly ---------------------------------------------

def cut_blocks(tokens: torch.Tensor, sample_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N + 1) blocks -> (n * N / seq_len, seq_len + 1) sequences (each with its next-token label) and
    (same rows, 2) ids ``[sample_id, piece]`` that seed any synthetic replacement."""
    n, width = tokens.shape
    per = (width - 1) // seq_len
    cols = torch.arange(per)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    seqs = tokens[:, cols].reshape(n * per, seq_len + 1)
    piece_ids = torch.stack([sample_ids.repeat_interleave(per), torch.arange(per).repeat(n)], dim=1)
    return seqs, piece_ids


def document_starts(input_ids: torch.Tensor, doc_sep: int) -> torch.Tensor:
    """(B, T) first position of each token's document: 0, or just after the last separator before it
    (a separator belongs to the document it ends)."""
    T = input_ids.shape[1]
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == doc_sep
    positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    return torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values


def inject_tasks(seqs: torch.Tensor, piece_ids: torch.Tensor, tokenizer, share: float, tasks: Sequence[str],
                 seed: int) -> tuple[torch.Tensor, list[str | None]]:
    """Replace each sequence with probability ``share`` by a synthetic task over its own text.
    Returns the new sequences and, per row, the task name or None."""
    out, chosen = seqs.clone(), []
    length = seqs.shape[1]
    for row, (sample_id, piece) in enumerate(piece_ids.tolist()):
        rng = np.random.default_rng([seed, sample_id, piece, length])
        if rng.random() >= share:
            chosen.append(None)
            continue
        name = tasks[int(rng.integers(len(tasks)))]
        sample = TASKS[name](tokenizer, seqs[row].numpy(), length, rng)
        out[row] = torch.from_numpy(sample.tokens)
        chosen.append(name)
    return out, chosen


def _check_shapes(seq_len: int, tokens_per_batch: int, block_len: int) -> None:
    if block_len % seq_len:
        raise ConfigError(f"data seq_len={seq_len} must divide the shards' block_len={block_len} "
                          f"(write shards with a --block-len that is a multiple of it)")
    if tokens_per_batch % block_len:
        raise ConfigError(f"data tokens_per_batch={tokens_per_batch} must be a multiple of the shards' "
                          f"block_len={block_len}: a batch is made of whole blocks (write shards with a smaller "
                          f"--block-len, or raise tokens_per_batch)")


def _as_streams(value: Streams, field: str) -> list[StreamSpec]:
    if isinstance(value, (str, Path)):
        return [StreamSpec(local=str(value))]
    streams = []
    for i, s in enumerate(value):
        if isinstance(s, (str, Path)):
            s = {"local": str(s)}
        try:
            streams.append(s if isinstance(s, StreamSpec) else StreamSpec(**s))
        except TypeError as e:
            raise ConfigError(f"data {field}[{i}]={s!r}: a folder or {{local, remote, proportion}} ({e})") from None
    if not streams:
        raise ConfigError(f"data {field}: give a shard folder or a non-empty list of streams")
    given = [s.proportion for s in streams if s.proportion is not None]
    if given and len(given) != len(streams):
        raise ConfigError(f"data {field}: set proportion on every stream or on none")
    if any(p <= 0 for p in given):
        raise ConfigError(f"data {field}: proportions {given} must all be > 0")
    return streams


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    # streaming hands out read-only numpy views; copy once into a writable int64 tensor
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    return {"tokens": tokens, "sample_ids": torch.tensor([s["sample_id"] for s in samples], dtype=torch.int64)}


SHM_PREFIX_ATTEMPTS = 5  # tries at claiming streaming's shared memory (see _make_dataset)


def _make_dataset(streams: list[StreamSpec], batch_size: int, shuffle: bool, seed: int):
    from streaming import Stream

    from hsa_lightning.data.streaming_dataset import IndexedStreamingDataset

    for attempt in range(SHM_PREFIX_ATTEMPTS):
        mixed = [Stream(local=s.local, remote=s.remote, proportion=s.proportion) for s in streams]  # init edits them
        try:
            return IndexedStreamingDataset(streams=mixed, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
                                           shuffle_algo="py1e")
        except FileExistsError as e:
            # streaming looks for a free shared-memory prefix, then creates it: two jobs starting together
            # on one host can both pick the same one (mosaicml/streaming#901). A single process can simply
            # look again; ranks of one job would leave each other at different barriers, so they stop.
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            if distributed or attempt == SHM_PREFIX_ATTEMPTS - 1:
                raise RuntimeError(
                    f"streaming's shared memory {e.filename!r} was created by another job starting at the same "
                    "time on this host (mosaicml/streaming#901); start jobs on one host a few seconds apart") from e
            time.sleep(random.uniform(0.2, 2.0))


def _remove_stale_shared_memory(local_dirs: list[str]) -> None:
    """Unlink streaming's shared memory left for *our* folders by a run that has died.

    ``streaming.base.util.clean_stale_shared_memory`` removes every job's shared memory on the host,
    breaking live jobs. Here a prefix is removed only if it lists one of our folders and no live process
    maps any of its segments (``/proc/*/maps``); without ``/proc`` nothing is removed.
    """
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    mapped = _mapped_shared_memory()
    if mapped is None:
        return
    shm_dir = Path("/dev/shm")  # where Linux keeps POSIX shared memory; /proc implies Linux
    missing = 0
    for prefix in range(1 << 16):
        names = [_get_path(prefix, name) for name in SHM_TO_CLEAN]
        locals_file = shm_dir / _get_path(prefix, LOCALS)
        if not locals_file.is_file():
            missing += 1
            if missing > 64:
                return
            continue
        missing = 0
        theirs, _ = _unpack_locals(locals_file.read_bytes())
        if not set(theirs) & set(local_dirs) or any(name in mapped for name in names):
            continue  # another job's, or alive
        for name in names:
            (shm_dir / name).unlink(missing_ok=True)


def _mapped_shared_memory() -> set[str] | None:
    """Names of the /dev/shm segments some live process maps (None where /proc is unavailable)."""
    proc = Path("/proc")
    if not (proc / "self" / "maps").exists():
        return None
    names = set()
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            if "/dev/shm/" in line:
                names.add(line.rsplit("/dev/shm/", 1)[1].split(" ")[0])
    return names
