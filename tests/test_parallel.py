"""Activation checkpointing, and every strategy from one config: single device, DDP, FSDP1 and FSDP2
(2 gloo processes on CPU) follow the same loss curve from the same weights and global batch; FSDP2
resumes from its sharded checkpoint exactly; a sharded checkpoint starts a new run (init_weights)."""
import csv
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, build_model, child_env, run_cli
from hsa_lightning.lit.parallel import ParallelConfig, prepare
from hsa_lightning.params import lit_module


def _saved_tensors(model, ids) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, n = model.loss(ids, ids)
    return nll / n, count


@pytest.mark.parametrize("ffn", [("SwiGLU", {}), ("MoE", {"experts": 4, "active": 2, "expert_hidden": 16})])
def test_activation_checkpointing_recomputes_the_same_loss_and_gradients(ffn):
    ids = torch.randint(0, 64, (2, 45))  # not a multiple of the chunk size
    results = []
    for recompute in (False, True):
        model = prepare(build_model(ffn=ffn, gumbel_noise=True).train(),
                        ParallelConfig(activation_checkpointing=recompute))
        torch.manual_seed(1)  # Gumbel noise: the recompute must draw the same noise, so select the same chunks
        loss, saved = _saved_tensors(model, ids)
        loss.backward()
        results.append((loss.detach(), saved, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (plain_loss, plain_saved, plain_grads), (ac_loss, ac_saved, ac_grads) = results
    assert ac_saved < plain_saved / 2  # only each unit's inputs are kept
    assert torch.equal(ac_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ac_grads[name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_compiled_units_match_eager_with_one_graph_per_kind_of_unit_and_length(monkeypatch):
    """Per-unit compilation: the same loss and gradients as eager, no graph break (RoPE's table is an opaque
    op), and one graph per kind of unit (chunk encoder, block, HSA block) and length, so a curriculum's
    lengths never exhaust a shared recompile limit. aot_eager keeps it fast on CPU; GPU runs (test_gpu.py)
    use inductor."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    layout = ("UltraLong", {"groups": 2})
    eager = build_model(layout=layout, dtype=torch.float32).train()
    compiled = prepare(build_model(layout=layout, dtype=torch.float32).train(), ParallelConfig(compile=True))
    assert [type(u).__name__ for u in compiled.units()] == ["ChunkEncoder", "Block", "Block", "HSABlock", "HSABlock"]
    for T in (45, 64, 45):  # 45: not a multiple of the chunk size; back to 45: no new graph
        ids = torch.randint(0, 64, (2, T))
        grads = []
        for model in (eager, compiled):
            model.zero_grad()
            nll, n = model.loss(ids, ids)
            (nll / n).backward()
            grads.append((nll.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
        (eager_nll, eager_grads), (compiled_nll, compiled_grads) = grads
        torch.testing.assert_close(compiled_nll, eager_nll, rtol=1e-5, atol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 3 * 2
    torch._dynamo.reset()


# -- every strategy from one config (subprocesses) -------------------------------------------------
STEPS = 4
GLOBAL_BATCH = 4


def _initial_weights(path) -> None:
    """One set of starting weights for every run (meta-device init under FSDP2 draws others)."""
    module = lit_module(str(ROOT / "configs/tiny.yaml"))
    module.configure_model()
    torch.save({"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}, path)


def _fit(tmp_path, name, strategy=None, extra=(), accelerator="cpu"):
    root = tmp_path / name
    devices = 1 if strategy is None else 2
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.accelerator", accelerator,
            *([] if strategy is None else ["--config", str(ROOT / f"configs/strategies/{strategy}.yaml")]),
            "--trainer.devices", str(devices), "--data.init_args.batch_size", str(GLOBAL_BATCH // devices),
            "--data.init_args.seq_len", "256", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.log_every_n_steps", "1", "--trainer.gradient_clip_val", "0.5", "--trainer.max_steps", str(STEPS),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.init_weights", str(tmp_path / "init.pt"), *extra]
    if strategy == "fsdp2":
        args += ["--model.parallel.param_dtype", "fp32"]  # compare in fp32
    res = run_cli(args, tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return root


def _curve(root, version=0):
    with open(root / f"lightning_logs/version_{version}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): (float(r["train/loss"]), float(r["train/grad_norm"])) for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strategies")
    _initial_weights(tmp / "init.pt")
    return tmp, _curve(_fit(tmp, "single"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])  # FSDP1: Lightning needs GPUs (tests/test_gpu.py)
def test_strategy_follows_the_single_device_loss_curve(runs, strategy):
    check_strategy_curve(*runs, strategy)


def check_strategy_curve(tmp, single, strategy, accelerator="cpu"):
    assert len(single) == STEPS and max(g for _, g in single.values()) > 0.5  # clipping is active
    curve = _curve(_fit(tmp, strategy, strategy, accelerator=accelerator))
    assert curve.keys() == single.keys()
    for step, (loss, grad_norm) in single.items():  # same weights, same global batch, fp32
        assert curve[step][0] == pytest.approx(loss, abs=2e-5), (strategy, step)
        assert curve[step][1] == pytest.approx(grad_norm, rel=1e-4), (strategy, step)  # the sharded norm is global


@pytest.mark.slow
def test_fsdp2_resumes_from_its_sharded_checkpoint_and_it_starts_a_new_run(runs):
    tmp, single = runs
    every = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "2",
             "--trainer.callbacks.save_top_k", "-1"]
    root = _fit(tmp, "fsdp2_ckpt", "fsdp2", every)
    half = root / "lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt"
    assert (half / ".metadata").is_file() and len(list(half.glob("*.distcp"))) == 2  # one shard file per rank
    full = _curve(root)
    resumed = _fit(tmp, "fsdp2_resume", "fsdp2", ["--ckpt_path", str(half)])
    tail = _curve(resumed)
    assert sorted(tail) == [s for s in sorted(full) if s >= 2]
    for step, (loss, grad_norm) in tail.items():  # model, optimizer, scheduler and data position restored
        assert loss == pytest.approx(full[step][0], abs=1e-6), step
    # one file from the folder; init_weights reads the folder itself in one process, to the same weights
    out = tmp / "step2.ckpt"
    done = subprocess.run([sys.executable, "-m", "hsa_lightning.lit.consolidate", str(half), "-o", str(out)],
                          capture_output=True, text=True, env=child_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout and not list(tmp.glob(".step2.ckpt.partial*"))
    checkpoint = torch.load(out, weights_only=False)
    consolidated = checkpoint["state_dict"]
    assert checkpoint["global_step"] == 2 and "hyper_parameters" in checkpoint
    initial = torch.load(tmp / "init.pt")["state_dict"]
    module = lit_module(str(ROOT / "configs/tiny.yaml"))
    module.hparams.init_weights = str(half)
    module.configure_model()
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, consolidated[f"model.{name}"]), name
    assert not torch.equal(consolidated["model.embed.weight"], initial["model.embed.weight"])  # it trained


@pytest.mark.parametrize("strategy,expected", [("fsdp2", "hsa_lightning.lit.fsdp2_strategy.FSDP2Strategy"),
                                               ("fsdp1", "lightning.pytorch.strategies.FSDPStrategy"),
                                               ("ddp", "ddp"), ("single", "auto")])
def test_strategy_files_stack_on_a_run_config_and_print_config_counts_parameters(strategy, expected, capsys):
    import yaml

    from hsa_lightning.cli import main
    from hsa_lightning.params import count, describe

    run = str(ROOT / "configs/dense_0p5b.yaml")
    main(["fit", "--config", run, "--config", str(ROOT / f"configs/strategies/{strategy}.yaml"), "--print_config"])
    out = capsys.readouterr().out
    tree = yaml.safe_load(out)
    chosen = tree["trainer"]["strategy"]
    assert (chosen if isinstance(chosen, str) else chosen["class_path"]) == expected
    if strategy == "fsdp1":  # every block kind and the chunk encoder is a wrap unit
        assert {c.rsplit(".", 1)[1] for c in chosen["init_args"]["auto_wrap_policy"]} == {"Block", "HSABlock", "ChunkEncoder"}
    assert tree["model"]["config"]["d_model"] == 1024  # the run config is kept underneath
    assert out.rstrip().splitlines()[-1] == f"# model: {describe(*count(run))}"


def test_consolidate_refuses_what_is_not_a_sharded_checkpoint(tmp_path, capsys):
    from hsa_lightning.lit.consolidate import main

    (tmp_path / "a.ckpt").write_bytes(b"")
    assert main([str(tmp_path / "a.ckpt")]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint '{tmp_path / 'a.ckpt'}' is not a sharded checkpoint "
                                       f"folder (.metadata and meta.pt)\n")
