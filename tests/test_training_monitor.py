"""TrainingMonitor: tokens/s, tokens seen, gradient norm, curriculum stage; and the FLOPs it divides by."""
import csv

import lightning as L
import pytest
import torch

from conftest import build_model
from hsa_lightning.errors import ConfigError
from hsa_lightning.lit.curriculum_callback import Curriculum
from hsa_lightning.lit.module import HSALitModule
from hsa_lightning.lit.synthetic_datamodule import SyntheticDataModule
from hsa_lightning.lit.training_monitor import TrainingMonitor


def test_flops_per_token_counts_parameters_windows_and_selected_chunks():
    # SWA layout, 4 blocks of window 6 at T=10: mean keys per query = (1+2+...+6 + 4*6) / 10 = 4.5
    swa = build_model("HSAReference", ("SWA", {}))
    per_key = 4 * 4 * 8  # 4 x heads x head_dim
    assert swa.flops_per_token(10) == pytest.approx(6 * swa.num_parameters() + 3 * 4 * per_key * 4.5)
    # Dense at T=8: 4 full layers, mean keys (T + 1) / 2
    dense = build_model("HSAReference", ("Dense", {}))
    assert dense.flops_per_token(8) == pytest.approx(6 * dense.num_parameters() + 3 * 4 * per_key * 4.5)
    # UltraLong, 1 group at T=64 with chunks of 8: 2 SWA + encoder (S+1 keys) + HSA (its SWA + top-2 chunks
    # + scores over the (64 / 8 - 1) / 2 = 3.5 visible chunks on average) + 1 SWA: 4 windowed attentions
    ul = build_model("HSAReference", ("UltraLong", {"groups": 1}))
    swa_keys = (6 * 7 / 2 + 58 * 6) / 64
    attention = 4 * per_key * swa_keys + per_key * 9 + per_key * 2 * 8 + 2 * 32 * 3.5
    assert ul.flops_per_token(64) == pytest.approx(6 * ul.num_parameters() + 3 * attention)
    flash = build_model("Flash", ("UltraLong", {"groups": 1}))  # every visible chunk, no scores
    attention = 4 * per_key * swa_keys + per_key * 9 + per_key * 3.5 * 8
    assert flash.flops_per_token(64) == pytest.approx(6 * flash.num_parameters() + 3 * attention)


def test_monitor_logs_throughput_tokens_and_the_unclipped_gradient_norm(tmp_path):
    module = HSALitModule(config={"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                                  "chunk_size": 16, "top_k": 2, "window": 32}, layout="SWA")
    data = SyntheticDataModule(seq_len=64, batch_size=2, val_samples=2, test_samples=2)
    monitor = TrainingMonitor(peak_tflops=1e-3)  # a made-up peak so MFU is logged on CPU
    stages = Curriculum([{"class_path": "Stage", "init_args": {"steps": 2, "window": 16}}, "Stage"])
    trainer = L.Trainer(accelerator="cpu", max_steps=4, log_every_n_steps=1, gradient_clip_val=1e-4,
                        limit_val_batches=0, logger=L.pytorch.loggers.CSVLogger(tmp_path), callbacks=[stages, monitor],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, data)
    with open(tmp_path / "lightning_logs/version_0/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/tokens_seen")]
    assert [float(r["perf/tokens_seen"]) for r in rows] == [128.0, 256.0, 384.0, 512.0]
    assert all(float(r["perf/tokens_per_s"]) > 0 for r in rows)
    flops = module.model.flops_per_token(64)  # with the configured window 32, as in the last stage
    for r in rows[2:]:  # MFU is the model's FLOPs at the measured rate over the peak
        assert float(r["perf/mfu"]) == pytest.approx(flops * float(r["perf/tokens_per_s"]) / 1e9, rel=1e-4)
    for r in rows[:2]:  # the first stage's window of 16 costs fewer FLOPs per token
        assert float(r["perf/mfu"]) < flops * float(r["perf/tokens_per_s"]) / 1e9 * 0.999
    norms = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    assert len(norms) == 4 and all(n > 1e-4 for n in norms)  # measured before clipping to 1e-4
    assert [float(r["curriculum/stage"]) for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert monitor.state_dict() == {"tokens_seen": 512}
    with pytest.raises(ConfigError, match=r"TrainingMonitor peak_tflops=0 must be > 0"):
        TrainingMonitor(peak_tflops=0)


def test_progress_bar_shows_tokens_seen_and_the_run_eta(tmp_path):
    import re

    from hsa_lightning.lit.progress import TrainingProgressBar

    module = HSALitModule(config={"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                                  "chunk_size": 16, "top_k": 2, "window": 32}, layout="SWA")
    bar = TrainingProgressBar()
    seen = []

    class Peek(L.Callback):  # what the bar would show after each step
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(bar.get_metrics(trainer, pl_module))

    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        callbacks=[TrainingMonitor(), bar, Peek()], enable_model_summary=False)
    trainer.fit(module, SyntheticDataModule(seq_len=512, batch_size=2))
    assert [m["tokens"] for m in seen] == ["1.0K", "2.0K", "3.1K"]  # 2 x 512 tokens per step
    assert all("perf/tokens_seen" not in m for m in seen)
    assert all(re.fullmatch(r"\d+:\d\d:\d\d", m["eta"]) for m in seen[:-1]) and seen[-1]["eta"] == "0:00:00"
    assert bar._get_train_description(0) == "Epoch 0"  # not Lightning's "Epoch 0/-2" when max_steps bounds the run
