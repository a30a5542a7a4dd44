"""Train a trivial module on a StreamingDataModule and record every batch it sees (resume tests).

    python record_batches.py SHARDS OUT.json --steps N [--devices 2] [--save-at K CKPT_DIR] [--resume CKPT]

Each rank writes OUT.rank{r}.json: the list of (step, sha1 of input_ids) in training order.
"""
from __future__ import annotations

import argparse
import hashlib
import json

import lightning as L
import torch

from hsa_lightning.lit.streaming_datamodule import StreamingDataModule


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, str]] = []

    def training_step(self, batch, batch_idx):
        digest = hashlib.sha1(batch["input_ids"].numpy().tobytes() + batch["labels"].numpy().tobytes()).hexdigest()
        self.seen.append((self.global_step, digest))
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--save-at", nargs=2, metavar=("STEP", "DIR"))
    ap.add_argument("--resume")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    L.seed_everything(0)
    data = StreamingDataModule(train=args.shards, seq_len=512, tokens_per_batch=1024, synthetic_share=0.3, synthetic_tasks=["s_niah", "vt"],
                               num_workers=args.workers, seed=1)
    callbacks = []
    if args.save_at:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=args.save_at[1], every_n_train_steps=int(args.save_at[0]), save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=args.steps, logger=False, enable_checkpointing=bool(args.save_at),
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    module = Recorder()
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    with open(f"{args.out}.rank{trainer.global_rank}.json", "w") as f:
        json.dump(module.seen, f)


if __name__ == "__main__":
    main()
