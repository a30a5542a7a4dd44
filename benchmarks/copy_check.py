"""Does a checkpoint copy through its memory? A CPU check for the self-copy probes (not a test).

On held-out blocks of the tiny synthetic corpus it scores the second half of S||S (the copy is there, 256
tokens back, beyond the window) and of R||S (the same 256 tokens behind another block's text: nothing to
copy). A model that copies scores the first far lower; a plain language model scores both alike.

    python benchmarks/copy_check.py runs/probes/<run>/lightning_logs/version_0/checkpoints/<step>.ckpt
"""
from __future__ import annotations

import argparse

import torch

from hsa_lightning.kernels.cross_entropy import IGNORE_INDEX
from hsa_lightning.lit.module import HSALitModule
from hsa_lightning.lit.synthetic_datamodule import SyntheticDataModule
from hsa_lightning.registry import load_plugins


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--seq-len", type=int, default=512, help="length of S||S (the tiny probes' sequence)")
    p.add_argument("--blocks", type=int, default=64, help="held-out blocks scored")
    args = p.parse_args()

    load_plugins()
    saved = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    module = HSALitModule(**{k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")})
    module.configure_model()
    module.load_weights(args.checkpoint)
    model = module.model.eval()
    model.set_top_k("all")  # as the self-copy stage trains it
    data = SyntheticDataModule(seq_len=args.seq_len, val_samples=args.blocks)
    blocks = torch.cat([b["input_ids"] for b in data.val_dataloader()])
    half = args.seq_len // 2
    s, other = blocks[:, :half], torch.roll(blocks, 1, 0)[:, half:]  # other: another block's text
    with torch.no_grad():
        for name, front in (("S||S (the copy is there)", s), ("R||S (nothing to copy)", other)):
            x = torch.cat([front, s], 1)
            labels = torch.full_like(x, IGNORE_INDEX)
            labels[:, half:-1] = x[:, half + 1:]  # the second half only
            nll, n = model.loss(x, labels)
            print(f"{name}: loss of the second half {float(nll / n):.3f}")


if __name__ == "__main__":
    main()
