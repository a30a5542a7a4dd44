"""MoE FFN: grouped experts against the per-token loop, routing, loss-free balancing, checkpoints, training."""
import lightning as L
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from conftest import build_model, plugin
from hsa_lightning.errors import ConfigError
from hsa_lightning.kernels.moe import parallel, routed_experts, routed_experts_reference
from hsa_lightning.model.ffn import SwiGLUMLP
from hsa_lightning.plugins.ffn.moe import MoELayer


def random_routing(N, E, k, generator=None):
    indices = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(N)])
    return indices, torch.rand(N, k, generator=generator)


def expert_weights(E, d, h, dtype=torch.float32):
    return [torch.randn(E, d, h, dtype=dtype) / d**0.5, torch.randn(E, d, h, dtype=dtype) / d**0.5,
            torch.randn(E, h, d, dtype=dtype) / h**0.5]


@pytest.mark.parametrize("grouped_mm", [True, False])
@pytest.mark.parametrize("E, k", [(1, 1), (8, 2), (16, 4)])
def test_grouped_experts_match_the_per_token_loop(E, k, grouped_mm, monkeypatch):
    if not grouped_mm:
        monkeypatch.setattr(parallel, "_grouped_mm_supported", lambda a: False)
    N, d, h = 37, 16, 24
    x = torch.randn(N, d)
    indices, weights = random_routing(N, E, k)
    if E > 4:  # two experts get no token at all
        indices = torch.stack([torch.randperm(E - 2)[:k] for _ in range(N)])
    ws = expert_weights(E, d, h)
    leaves = [t.clone().requires_grad_() for t in (x, weights, *ws)]
    out, counts, dropped = routed_experts(leaves[0], indices, *leaves[1:])
    ref_leaves = [t.clone().requires_grad_() for t in (x, weights, *ws)]
    ref = routed_experts_reference(ref_leaves[0], indices, *ref_leaves[1:])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert counts.tolist() == torch.bincount(indices.reshape(-1), minlength=E).tolist() and dropped == 0


def test_capacity_drops_the_latest_assignments_of_full_experts():
    N, E, k, d, h = 40, 4, 2, 8, 8
    x = torch.randn(N, d)
    indices, weights = random_routing(N, E, k)
    indices[:, 0] = 0  # expert 0 is asked by every token
    ws = expert_weights(E, d, h)
    capacity = 12
    out, counts, dropped = routed_experts(x, indices, weights, *ws, capacity=capacity)
    kept = weights.clone()
    seen = [0] * E
    for n in range(N):  # first come (token order), first served
        for j in range(k):
            e = int(indices[n, j])
            seen[e] += 1
            if seen[e] > capacity:
                kept[n, j] = 0
    torch.testing.assert_close(out, routed_experts_reference(x, indices, kept, *ws), rtol=1e-5, atol=1e-5)
    assert int(dropped) == sum(max(s - capacity, 0) for s in seen) > 0
    assert counts.tolist() == seen  # what experts were asked for: the balancing signal sees the overflow

    layer = moe_layer(capacity_factor=1.0).train()  # 8 experts, 2 active: capacity 2 * 40 / 8 = 10
    with torch.no_grad():
        layer.router[0] += 1.0  # expert 0 is everyone's first choice
    x = torch.randn(40, 24).abs()
    layer(x)
    asked = torch.bincount(layer.route(x)[0].reshape(-1), minlength=8)
    assert asked[0] == 40
    stats = layer.routing_stats()
    assert float(stats["dropped"]) == pytest.approx(float((asked - 10).clamp_min(0).sum()) / 80)
    assert float(stats["load_max"]) == pytest.approx(40 / 10)  # the real imbalance, not the capacity
    assert "dropped" not in moe_layer().routing_stats()


def moe_layer(**spec) -> MoELayer:
    ffn = plugin("ffn", "MoE", **{"experts": 8, "active": 2, "expert_hidden": 16, **spec})
    layer = ffn.build(24, 3, 0.02, 0.01)
    assert isinstance(layer, MoELayer)
    return layer


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_moe_layer_equals_routing_plus_per_token_loop(score):
    layer = moe_layer(score=score).double()
    layer.routing_bias.copy_(torch.randn(8, dtype=torch.float64))
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    out = layer(x)
    flat = x.reshape(-1, 24)
    logits = flat @ layer.router.t()
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1)
    indices = torch.topk(scores + layer.routing_bias, 2, dim=-1).indices  # the bias picks...
    weights = torch.gather(scores, -1, indices)  # ...but never weighs
    weights = weights / weights.sum(-1, keepdim=True)
    ref = routed_experts_reference(flat, indices, weights, layer.w_gate, layer.w_up, layer.w_down)
    torch.testing.assert_close(out, (ref + layer.shared(flat)).reshape(x.shape))


def test_first_layers_stay_dense_and_config_errors():
    moe = plugin("ffn", "MoE", experts=8, active=2, dense_layers=1)
    assert isinstance(moe.build(32, -1, 0.02, 0.01), SwiGLUMLP)  # chunk encoder
    assert isinstance(moe.build(32, 0, 0.02, 0.01), SwiGLUMLP)
    layer = moe.build(32, 1, 0.02, 0.01)
    assert isinstance(layer, MoELayer) and layer.w_gate.shape == (8, 32, 64)  # half the dense width (128)
    with pytest.raises(ConfigError, match=r"MoE active=9 must be <= experts=8"):
        plugin("ffn", "MoE", experts=8, active=9)
    with pytest.raises(ConfigError, match=r"MoE capacity_factor=0 must be > 0"):
        plugin("ffn", "MoE", capacity_factor=0)
    with pytest.raises(ConfigError, match=r"MoE score='Sigmoid' must be 'sigmoid' or 'softmax'"):
        plugin("ffn", "MoE", score="Sigmoid")


def test_loss_free_balancing_evens_a_skewed_router():
    def cv_trajectory(rate):
        torch.manual_seed(0)
        layer = moe_layer(bias_update_rate=rate)
        with torch.no_grad():  # with inputs of positive mean, experts 0 and 1 win nearly every token
            layer.router.normal_(std=0.3)
            layer.router[0] += 0.3
            layer.router[1] += 0.2
        x = torch.randn(512, 24) + 1
        layer.train()
        cvs = []
        for _ in range(200):
            layer(x)
            cvs.append(float(layer.routing_stats()["load_cv"]))
            layer.after_optimizer_step()
        return cvs, layer.routing_bias

    fixed, bias = cv_trajectory(0.0)
    assert fixed[0] > 1.5 and fixed[-1] == fixed[0] and not bias.any()  # no update, no balance
    balanced, bias = cv_trajectory(0.01)
    assert balanced[0] == fixed[0] and balanced[-1] < 0.35, balanced[::20]
    assert float(bias[0]) < 0 and float(bias[1]) < 0 and float(bias[2:].mean()) > 0


def test_bias_gets_no_gradient_aux_loss_does_and_state_is_checkpointed():
    layer = moe_layer(aux_loss_weight=0.01)
    layer.train()
    x = torch.randn(3, 7, 24)
    out = layer(x)
    aux = layer.take_aux_loss()
    (out.square().mean() + aux).backward()
    assert layer.take_aux_loss() is None  # taken once
    assert not layer.routing_bias.requires_grad and layer.routing_bias.grad is None
    assert "routing_bias" not in dict(layer.named_parameters())
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0  # through weights and aux
    state = layer.state_dict()
    assert "routing_bias" in state and "load" not in state
    layer.eval()
    before = layer.load.clone()
    layer(x)
    assert torch.equal(layer.load, before)  # evaluation does not count toward balancing
    plain = moe_layer().train()
    plain(x)
    assert plain.take_aux_loss() is None  # no auxiliary loss unless asked for


def test_checkpointed_and_autocast_forward():
    layer = moe_layer()
    layer.train()
    x = torch.randn(2, 11, 24, requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    recomputed = checkpoint(layer, x2, use_reentrant=False)
    recomputed.backward(torch.ones_like(recomputed))
    torch.testing.assert_close(recomputed, out)
    for g, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(p.grad, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
        assert layer.route(x.reshape(-1, 24))[2].dtype == torch.float32  # routing stays fp32
    assert low.dtype == torch.bfloat16
    assert layer.to(torch.bfloat16).routing_bias.dtype == torch.float32  # balancing state too
    torch.testing.assert_close(low.float(), out, rtol=0.1, atol=0.02)


def test_active_parameter_count():
    model = build_model(ffn=("MoE", {"experts": 8, "active": 2, "expert_hidden": 16}), dtype=torch.float32)
    layers = model.routed_ffns()
    assert len(layers) == len(model.blocks) - 1  # all but the first block
    per_expert = 3 * 32 * 16
    assert model.num_parameters() - model.num_parameters(active=True) == len(layers) * 6 * per_expert


def test_moe_model_trains_and_balances(tmp_path, monkeypatch):
    from hsa_lightning.lit.module import HSALitModule
    from hsa_lightning.lit.synthetic_datamodule import SyntheticDataModule

    calls, loads = [], []
    original = MoELayer.after_optimizer_step

    def counted(self):
        calls.append(id(self))
        loads.append(float(self.load.sum()))
        original(self)

    monkeypatch.setattr(MoELayer, "after_optimizer_step", counted)

    module = HSALitModule(
        config=dict(vocab_size=258, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, chunk_size=16, top_k=2,
                    window=32),
        layout={"class_path": "UltraLong", "init_args": {"groups": 1}},
        ffn={"class_path": "MoE", "init_args": {"experts": 4, "active": 2, "bias_update_rate": 0.05}},
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=4, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, SyntheticDataModule(seq_len=64, batch_size=2, train_samples=64))
    layers = module.model.routed_ffns()
    assert sorted(calls) == sorted([id(m) for m in layers] * 4)  # once per optimizer step, not per batch
    # each update saw the assignments of its 2 micro-batches: 2 x 2 sequences x 64 tokens x 2 experts
    assert loads == [2 * 2 * 64 * 2.0] * len(calls)
    assert {"moe/0/load_cv", "moe/0/load_max", "moe/0/load_min"} <= set(trainer.callback_metrics)


def test_fsdp2_sharded_moe_matches_unsharded(tmp_path):
    """Two gloo processes: experts sharded along the expert dimension give the same loss, gradients and
    balancing update as one unsharded process."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, child_env

    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests/scripts/fsdp2_moe.py"), str(tmp_path / "out"), str(ROOT / "tests")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"out.rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["local_w_gate"] and all(shape[0] == 2 for shape in result["local_w_gate"])  # 4 experts / 2
        assert result["grad_err"] < 1e-6 and result["expert_grad"] > 0  # FSDP averages the two ranks' grads
        assert result["bias_equal"] and result["moved"]
    assert results[0]["bias"] == results[1]["bias"]  # the load is summed over ranks before the update


def test_paper_scale_config_is_8b_a1b_and_counts_without_allocating(capsys):
    from conftest import ROOT
    from hsa_lightning.params import count, main

    total, active = count(str(ROOT / "configs/moe_8b_a1b.yaml"))  # meta device: no 33 GB of fp32
    assert 7.5e9 < total < 8.5e9 and 0.9e9 < active < 1.2e9
    small_total, small_active = count(str(ROOT / "configs/moe_demo_gpu.yaml"))
    assert small_active < small_total / 3
    assert main([str(ROOT / "configs/moe_8b_a1b.yaml")]) == 0
    assert f"{total:,} parameters" in capsys.readouterr().out
    assert main([str(ROOT / "configs/nothing.yaml")]) == 2
    assert "error:" in capsys.readouterr().err
