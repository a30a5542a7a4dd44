"""SyntheticDataModule: the seeded synthetic corpus as train/val/test loaders (no files needed)."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

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
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          drop_last=split == "train", persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.train_samples)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.val_samples)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.test_samples)
