"""configs/experiments: each baseline or ablation is the main run plus exactly the change it names."""
import contextlib
import io
import sys
from unittest import mock

import pytest
import yaml

from conftest import ROOT
from hsa_lightning.cli import HSALightningCLI

EXPERIMENTS = ROOT / "configs/experiments"
STAGES = "trainer.callbacks.3.init_args.stages"
VARIANTS = {  # the resolved keys each file may (and must) change, besides its own run folder
    "dense": ["model.config.n_layers", "model.attention", "model.layout"],
    "swa": ["model.config.n_layers", "model.layout"],
    "hsa_rope": ["model.config.position_in_hsa"],
    "fusion_stick_breaking": ["model.config.fusion"],
    "fusion_joint_scored": ["model.config.fusion"],
    "fusion_joint": ["model.config.fusion"],
    "fusion_softmax_and_union": ["model.config.fusion"],
    "read_successor": ["model.config.read_successor"],
    "window_2048": ["model.config.window"],
    "window_2048_in_warmup": ["model.config.window", STAGES],
    "warmup_none": [STAGES],
    "warmup_self_copy": [STAGES],
    "warmup_self_copy_only": [STAGES],
    "tasks_after_warmup": [STAGES],
    "tasks_and_copy_after_warmup": [STAGES],
    "memory_mean_standard": ["model.config.landmark", "model.config.hsa_residual"],
    "chunk_16": ["model.config.chunk_size", "model.config.top_k"],
}


def resolved(*configs: str, subcommand: str = "fit", extra: tuple[str, ...] = ()) -> dict:
    """The config ``cli.py SUBCOMMAND --config ... --print_config`` prints (parsed here, nothing built);
    ``configs`` are experiment names or paths from the repository root ending in .yaml."""
    paths = [ROOT / c if c.endswith(".yaml") else EXPERIMENTS / f"{c}.yaml" for c in configs]
    args = [subcommand] + [a for p in paths for a in ("--config", str(p))]
    out = io.StringIO()
    with mock.patch.object(sys, "argv", ["cli.py"]), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        HSALightningCLI(args=[*args, *extra, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def flatten(tree, prefix="") -> dict:
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix[:-1]: tree}
    return {k: v for key, value in items for k, v in flatten(value, f"{prefix}{key}.").items()}


@pytest.fixture(scope="module")
def main():
    return flatten(resolved("main"))


def test_every_experiment_file_is_listed():
    files = {p.stem for p in EXPERIMENTS.glob("*.yaml")} - {"main", "eval"}
    assert files == set(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_changes_only_what_it_names(variant, main):
    cfg = flatten(resolved("main", variant))
    changed = {k for k in main.keys() | cfg.keys() if main.get(k) != cfg.get(k)}
    assert changed - {"trainer.default_root_dir"}, "the variant changes nothing"
    allowed = VARIANTS[variant]
    assert all(any(k == a or k.startswith(a + ".") for a in allowed) for k in changed - {"trainer.default_root_dir"})
    assert all(any(k == a or k.startswith(a + ".") for k in changed) for a in allowed)
    assert cfg["trainer.default_root_dir"] == f"runs/experiments/{variant}"
    assert cfg["trainer.max_steps"] == main["trainer.max_steps"]  # same tokens as the main run
    assert cfg["data.init_args.tokens_per_batch"] * cfg.get("trainer.accumulate_grad_batches", 1) == \
        main["data.init_args.tokens_per_batch"] * main.get("trainer.accumulate_grad_batches", 1)


def test_eval_config_stacks_on_any_run_and_names_its_output():
    cfg = resolved("main", "dense", "eval", subcommand="test", extra=("--trainer.callbacks.output_dir", "runs/eval/dense"))
    (callback,) = cfg["trainer"]["callbacks"]
    assert callback["class_path"].endswith("LengthEval") and callback["init_args"]["output_dir"] == "runs/eval/dense"
    assert "Dense" in str(cfg["model"]["layout"])
    assert max(cfg["data"]["init_args"]["lengths"]) >= 1 << 20
    assert cfg["model"]["parallel"]["compile"] is False  # compiling every length cost more than it saved
    data = cfg["data"]["init_args"]
    assert data["samples"] >= 16 and data["depth_samples"] * 10 >= 40  # Table 2's MQ-NIAH; S-NIAH's 10 depths


def test_cpu_self_copy_probe_copies_for_the_whole_tiny_run():
    cfg = flatten(resolved("configs/tiny.yaml", "configs/probes/self_copy_tiny.yaml"))
    stage = "trainer.callbacks.1.init_args.stages.0"
    assert cfg[f"{stage}.class_path"].endswith(".SelfCopy")
    assert cfg[f"{stage}.init_args.top_k"] == "all" and cfg[f"{stage}.init_args.steps"] is None
    assert cfg["model.layout.class_path"].endswith(".UltraLong") and cfg["data.init_args.seq_len"] == 512
    copy_only = flatten(resolved("configs/tiny.yaml", "configs/probes/self_copy_only_tiny.yaml"))
    assert copy_only[f"{stage}.init_args.score"] == "copy"
    assert {k: v for k, v in copy_only.items() if "score" not in k and "root_dir" not in k} == \
        {k: v for k, v in cfg.items() if "score" not in k and "root_dir" not in k}  # only the scoring differs
