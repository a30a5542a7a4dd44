"""End-to-end runs of `python cli.py` (fit, validate, test) and a real third-party plugin."""
import csv
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_cli

FAST = ["--trainer.limit_val_batches", "1", "--data.init_args.val_samples", "4", "--data.init_args.test_samples", "4",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def read_metrics(root, version=0):
    with open(root / f"lightning_logs/version_{version}/metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fit_validate_test_on_the_tiny_config(tmp_path):
    common = ["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
              "--data.init_args.seq_len", "256", "--data.init_args.batch_size", "4", *FAST]
    fit = run_cli(["fit", *common, "--trainer.max_steps", "12", "--trainer.val_check_interval", "12",
                   "--trainer.log_every_n_steps", "1"], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train) == 12 and len(val) == 1
    assert train[-1] < train[0] - 0.5  # it learns: the loss falls within a dozen steps
    (ckpt,) = (tmp_path / "run").glob("lightning_logs/version_0/checkpoints/*.ckpt")
    # CSV by default and TensorBoard beside it (installed with the test extra), in one version folder
    assert list((tmp_path / "run").glob("lightning_logs/version_0/events.out.tfevents.*"))
    for version, (command, key) in enumerate((("validate", "val/loss"), ("test", "test/loss")), start=1):
        res = run_cli([command, *common, "--ckpt_path", str(ckpt)], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        (row,) = read_metrics(tmp_path / "run", version)
        if command == "validate":  # the checkpoint holds the weights the last validation saw
            assert abs(float(row[key]) - val[-1]) < 1e-4
        else:
            assert float(row[key]) < train[0] - 0.5
    check_generate(ckpt, tmp_path)


def check_generate(ckpt, tmp_path):
    """`cli.py generate` continues a prompt exactly as greedy decoding of the full forward does."""
    import torch

    from hsa_lightning.data.tokenizer import ByteTokenizer
    from hsa_lightning.inference.cli import load_model

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The special magic number for long-context is: 1234. " * 3, encoding="utf-8")
    args = ["generate", "--config", str(ROOT / "configs/tiny.yaml"), "--ckpt_path", str(ckpt),
            "--max_new_tokens", "16", "--device", "cpu"]
    res = run_cli([*args, "--prompt_file", str(prompt)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[generate] prompt 156 tokens, 16 new tokens" in res.stderr
    model = load_model(str(ROOT / "configs/tiny.yaml"), str(ckpt), torch.device("cpu"), torch.float32)
    tok = ByteTokenizer()
    seq = torch.tensor([tok.encode(prompt.read_text())])
    with torch.no_grad():
        for _ in range(16):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert res.stdout == tok.decode(seq[0, 156:].tolist()) + "\n"
    missing = run_cli([*args, "--prompt_file", str(tmp_path / "nope.txt")], tmp_path)
    assert missing.returncode == 2 and f"error: --prompt_file '{tmp_path / 'nope.txt'}' is not a file" in missing.stderr


@pytest.mark.slow
def test_installed_third_party_plugin_trains_by_short_name(tmp_path):
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(ROOT / "tests/toy_plugin")], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    env = {"PYTHONPATH": str(site)}
    run = tmp_path / "run"
    res = run_cli(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.attention", "ToyAttention",
                   "--model.attention.sharpness", "2.0", "--trainer.default_root_dir", str(run),
                   "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
                   "--data.init_args.seq_len", "128", "--data.init_args.batch_size", "2", *FAST], tmp_path, env_extra=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (saved,) = run.glob("lightning_logs/version_0/config.yaml")
    attention = yaml.safe_load(saved.read_text())["model"]["attention"]
    assert attention == {"class_path": "hsa_toy_plugin.ToyAttention", "init_args": {"sharpness": 2.0}}
    assert len([r for r in read_metrics(run) if r.get("train/loss")]) == 3
    # Without the distribution on the path the name is unknown, and the error says which names exist.
    missing = run_cli(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.attention", "ToyAttention"],
                      tmp_path)
    assert missing.returncode == 2 and "unknown attention plugin 'ToyAttention'" in missing.stderr


@pytest.mark.slow
def test_demo_gpu_config_resolves(tmp_path):
    res = run_cli(["fit", "--config", str(ROOT / "configs/demo_gpu.yaml"), "--print_config"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = yaml.safe_load(res.stdout)
    data = cfg["data"]
    assert data["class_path"].endswith("StreamingDataModule")
    assert data["init_args"]["train"] == "data/demo/shards/train"
    assert data["init_args"]["tokens_per_batch"] % data["init_args"]["seq_len"] == 0
    assert cfg["model"]["config"]["vocab_size"] == 16384 and cfg["trainer"]["precision"] == "bf16-mixed"
