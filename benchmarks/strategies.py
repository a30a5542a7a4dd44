"""One GPU against two: the small model trained from the same weights with the same global batch on one
GPU (single device) and on two (FSDP2), then the two-GPU run resumed from its sharded checkpoint halfway.

    python -m benchmarks.strategies --out docs/bench/strategies.json [--steps 200] [--config ...]

Runs ``cli.py fit`` three times (subprocesses) and compares the logged ``train/loss`` curves: the one- and
two-GPU curves should agree within noise (the ranks read other blocks of the corpus, so batches differ),
and the resumed curve should continue the two-GPU one. Writes JSON and a PNG of the curves beside it,
and prints a table. Needs the demo shards (docs/data.md) and two GPUs.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from hsa_lightning.params import lit_module


def fit(root: Path, args: list[str]) -> float:
    print(f"fit -> {root}", flush=True)
    shutil.rmtree(root, ignore_errors=True)  # a run of an earlier invocation would be read as this one's
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "cli.py", "fit", *args, "--trainer.default_root_dir", str(root)],
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"fit in {root} failed:\n{res.stderr[-5000:]}")
    return time.perf_counter() - start


def curve(root: Path, key: str = "train/loss") -> dict[int, float]:
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small_gpu.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokens_per_step", type=int, default=32768, help="global; each of 2 GPUs takes half")
    ap.add_argument("--work", default="/tmp/strategies")
    ap.add_argument("--out", default="docs/bench/strategies.json")
    ap.add_argument("--reuse_one_gpu", action="store_true",
                    help="take the one-GPU curve from an earlier --out file instead of training it again")
    args = ap.parse_args()
    earlier = None
    if args.reuse_one_gpu:
        with open(args.out) as f:
            earlier = json.load(f)
        if earlier["meta"]["steps"] != args.steps or earlier["meta"]["config"] != args.config:
            raise SystemExit(f"--reuse_one_gpu: {args.out} holds {earlier['meta']['steps']} steps of "
                             f"{earlier['meta']['config']}, not {args.steps} of {args.config}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    init = work / "init.pt"
    m = lit_module(args.config)
    torch.manual_seed(0)  # the config's own init, once, so every run starts from these weights
    model = m.build_model()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, init)
    half = args.steps // 2
    common = ["--config", args.config, "--model.init_weights", str(init), "--trainer.max_steps", str(args.steps),
              "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", str(half),
              "--trainer.limit_val_batches", "4", "--trainer.enable_progress_bar", "false"]
    two = ["--config", "configs/strategies/fsdp2.yaml", "--trainer.devices", "2",
           "--data.init_args.tokens_per_batch", str(args.tokens_per_step // 2)]
    every = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", str(half),
             "--trainer.callbacks.save_top_k", "-1"]
    wall = {}
    if earlier is None:
        wall["one_gpu"] = fit(work / "one", [*common, "--trainer.devices", "1",
                                             "--data.init_args.tokens_per_batch", str(args.tokens_per_step)])
    wall["two_gpu_fsdp2"] = fit(work / "two", [*common, *two, *every])
    (mid,) = (work / "two").glob(f"lightning_logs/version_0/checkpoints/*step={half}.ckpt")
    wall["two_gpu_resumed"] = fit(work / "resumed", [*common, *two, "--ckpt_path", str(mid)])
    runs = (("one_gpu", "one"), ("two_gpu_fsdp2", "two"), ("two_gpu_resumed", "resumed"))[earlier is not None:]
    curves = {name: curve(work / d) for name, d in runs}
    vals = {name: curve(work / d, "val/loss") for name, d in runs}
    if earlier is not None:
        curves = {"one_gpu": {int(s): v for s, v in earlier["curves"]["one_gpu"].items()}, **curves}
        vals = {"one_gpu": {int(s): v for s, v in earlier["val_loss"]["one_gpu"].items()}, **vals}
        wall = {"one_gpu": earlier["meta"]["wall_s"]["one_gpu"], **wall}

    def window_mean(c, end, width=20):
        xs = [v for s, v in c.items() if end - width <= s < end]
        return sum(xs) / len(xs)

    marks = list(range(20, args.steps + 1, 20))
    table = {name: {m: window_mean(c, m) for m in marks if any(m - 20 <= s < m for s in c)} for name, c in curves.items()}
    resumed_steps = sorted(curves["two_gpu_resumed"])
    resume_diff = max(abs(curves["two_gpu_resumed"][s] - curves["two_gpu_fsdp2"][s]) for s in resumed_steps)
    result = {"meta": {"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}", "torch": torch.__version__,
                       "date": str(date.today()), "config": args.config, "steps": args.steps,
                       "tokens_per_step": args.tokens_per_step, "wall_s": wall,
                       "command": "python -m benchmarks.strategies " + " ".join(f"--{k} {v}" for k, v in vars(args).items())},
              "mean_loss_over_previous_20_steps": table, "val_loss": vals,
              "resumed_max_abs_diff": resume_diff, "curves": curves}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(list(c), list(c.values()), label=name, lw=1 if name != "two_gpu_resumed" else 2, alpha=0.8,
                ls="--" if name == "two_gpu_resumed" else "-")
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title=f"{args.config}: 1 GPU vs 2 GPUs (FSDP2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    print(json.dumps(result["meta"]))
    print("\n| steps (mean of the previous 20) | " + " | ".join(map(str, marks)) + " |\n|---|" + "---|" * len(marks))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[m]:.3f}" if m in row else "" for m in marks) + " |")
    print(f"\nval loss: {json.dumps(vals)}\nresumed vs uninterrupted, max |loss difference| over steps "
          f"{resumed_steps[0]}-{resumed_steps[-1]}: {resume_diff:.2e}")


if __name__ == "__main__":
    main()
