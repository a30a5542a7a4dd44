"""SyntheticDataModule: the seeded synthetic corpus as train/val/test loaders (no files needed)."""
from __future__ import annotations

import itertools

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hsa_lightning.data.synthetic import Haystack, packed_block
from hsa_lightning.data.tokenizer import ByteTokenizer
from hsa_lightning.errors import ConfigError

_SPLITS = {"train": 0, "val": 1, "test": 2}


class _Blocks(Dataset):
    def __init__(self, seed: int, split: str, n: int, seq_len: int, needle_share: float):
        self.seed, self.split, self.n, self.seq_len, self.needle_share = seed, _SPLITS[split], n, seq_len, needle_share
        self.haystack, self.tok = Haystack(seed), ByteTokenizer()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = torch.from_numpy(
            packed_block(self.seed, self.split, i, self.seq_len, self.needle_share, self.haystack, self.tok)
        )
        return {"input_ids": block[:-1], "labels": block[1:]}


class _RankShare(DistributedSampler):
    """Rank r reads samples r, r + W, r + 2W, ... in order, so the ranks' batches at a step together are
    the one-device batch of the same global size (Lightning's own distributed sampler would shuffle).
    After a resume it starts ``skip`` samples in."""

    skip = 0

    def __iter__(self):
        start, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), start, None)


class _Loader(DataLoader):
    """The training loader; its state (saved in checkpoints) is the samples this rank consumed."""

    consumed = 0

    def __iter__(self):
        self.consumed = self.sampler.skip
        return super().__iter__()

    def state_dict(self) -> dict:
        return {"samples": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.skip = state["samples"]


class SyntheticDataModule(L.LightningDataModule):
    """Packed blocks of ``seq_len`` byte tokens: generated prose, and ``needle_share`` of documents
    carrying a 7-digit needle that the closing question asks for."""

    def __init__(self, seq_len: int = 512, batch_size: int = 8, train_samples: int = 4096,
                 val_samples: int = 64, test_samples: int = 64, needle_share: float = 0.25,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        counts = dict(seq_len=seq_len, batch_size=batch_size, train_samples=train_samples,
                      val_samples=val_samples, test_samples=test_samples)
        for name, value in counts.items():
            if value < 1:
                raise ConfigError(f"data {name}={value} must be >= 1")
        if not 0.0 <= needle_share <= 1.0:
            raise ConfigError(f"data needle_share={needle_share} must be within [0, 1]")
        if num_workers < 0:
            raise ConfigError(f"data num_workers={num_workers} must be >= 0")
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.vocab_size = ByteTokenizer.vocab_size

    def _loader(self, split: str, n: int) -> DataLoader:
        h = self.hparams
        data = _Blocks(h.seed, split, n, self.seq_len, h.needle_share)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        loader = _Loader if split == "train" else DataLoader
        return loader(data, batch_size=self.batch_size, num_workers=self.num_workers,
                      sampler=_RankShare(data, num_replicas=world, rank=rank, shuffle=False, drop_last=True),
                      drop_last=split == "train", persistent_workers=self.num_workers > 0)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.trainer.train_dataloader.consumed += batch["input_ids"].shape[0]
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.train_samples)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.val_samples)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.test_samples)
