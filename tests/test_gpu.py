"""CUDA checks (skipped without a GPU): bf16 models and attention against float64 CPU references."""
import copy

import pytest
import torch

from conftest import build_model, plugin
from hsa_lightning.kernels.hsa import hsa_attention_reference
from hsa_lightning.model.blocks import HSABlock
from test_flash import naive_local_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.parametrize("attention", ["HSAReference", "Flash"])
@pytest.mark.parametrize("layout", [("UltraLong", {"groups": 2}), ("Dense", {}), ("SWA", {})], ids=str)
def test_bf16_cuda_model_matches_float64_cpu(attention, layout):
    ref = build_model(attention, layout, d_model=64, window=16)
    gpu = copy.deepcopy(ref).to("cuda", torch.bfloat16)
    x = torch.randint(0, 64, (2, 150))
    assert rel_err(gpu(x.cuda()), ref(x)) < 3e-2


@pytest.mark.parametrize("window", [None, 7, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_local_attention_on_cuda(window, dtype):
    q = torch.randn(2, 200, 8, 64, dtype=torch.float64)
    k, v = torch.randn(2, 200, 2, 64, dtype=torch.float64), torch.randn(2, 200, 2, 64, dtype=torch.float64)
    out = plugin("attention", "Flash").local_attention(*(t.to("cuda", dtype) for t in (q, k, v)), window)
    assert rel_err(out, naive_local_attention(q, k, v, window)) < 1e-2


def chunked_reference(q, k, v, w, idx, S, do, block=2048):
    """fp32 reference output and gradients, a block of tokens at a time (its autograd saves gathers)."""
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    k32.requires_grad_(), v32.requires_grad_()
    outs, dqs, dws = [], [], []
    dk, dv = torch.zeros_like(k32), torch.zeros_like(v32)
    for t0 in range(0, q.shape[1], block):
        sl = slice(t0, t0 + block)
        qb = q32[:, sl].clone().requires_grad_()
        wb = w[:, sl].detach().float().clone().requires_grad_()
        o = hsa_attention_reference(qb, k32, v32, wb, idx[:, sl], S)
        g = torch.autograd.grad(o, (qb, k32, v32, wb), do[:, sl].float())
        outs.append(o.detach()), dqs.append(g[0]), dws.append(g[3])
        dk += g[1]
        dv += g[2]
    return torch.cat(outs, 1), (torch.cat(dqs, 1), dk, dv, torch.cat(dws, 1))


@pytest.mark.parametrize("L,G,D,K", [(8192, 16, 128, 32), (32768, 16, 128, 32), (8192, 1, 64, 16), (4096, 4, 64, 16)])
def test_triton_bf16_matches_fp32_reference_and_is_deterministic(L, G, D, K):
    from hsa_lightning.kernels.hsa.parallel import hsa_attention
    from hsa_lightning.kernels.retrieval import fusion_weights, retrieval_scores, select_chunks

    torch.manual_seed(0)
    S, H = 64, 16
    hkv = H // G
    dev = "cuda"
    q = torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, L, hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, L, hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    # Realistic, overlapping selections: a smooth score field plus noise, through the model's rule.
    lmk = torch.randn(1, L // S, hkv, 32, device=dev)
    q_slc = torch.randn(1, L // S, hkv, 32, device=dev).repeat_interleave(S, 1) + 0.3 * torch.randn(1, L, hkv, 32, device=dev)
    scores = retrieval_scores(q_slc, lmk, S)
    idx, valid = select_chunks(scores, K)
    w = fusion_weights(scores, idx, valid).requires_grad_()
    do = torch.randn_like(q)
    out = hsa_attention(q, k, v, w, idx, S)
    grads = torch.autograd.grad(out, (q, k, v, w), do)
    ref_out, ref_grads = chunked_reference(q, k, v, w, idx, S, do)
    assert rel_err(out, ref_out) < 1e-2
    for name, a, b in zip("qkvw", grads, ref_grads):
        assert rel_err(a, b) < 1e-2, name
    again = torch.autograd.grad(hsa_attention(q, k, v, w, idx, S), (q, k, v, w), do)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))  # no atomics: bit-identical


@pytest.mark.parametrize("G,S,K", [(8, 16, 32), (1, 64, 16)])  # the copying model's shape; one head per KV head
def test_triton_joint_softmax_bf16_matches_fp32_reference_and_is_deterministic(G, S, K):
    from hsa_lightning.kernels.hsa import joint_chunk_attention_reference
    from hsa_lightning.kernels.hsa.joint import joint_chunk_attention
    from hsa_lightning.kernels.retrieval import fusion_weights, retrieval_scores, select_chunks

    torch.manual_seed(0)
    L, H, D = 4096, 8, 64
    hkv = H // G
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, L, hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    q_slc, landmarks = torch.randn(1, L, hkv, 32, device="cuda"), torch.randn(1, L // S, hkv, 32, device="cuda")
    scores = retrieval_scores(q_slc, landmarks, S)
    idx, valid = select_chunks(scores, K)
    w = fusion_weights(scores, idx, valid).requires_grad_()  # joint_scored's weights (joint's mask is a case)
    do = torch.randn_like(q)
    grads = torch.autograd.grad(joint_chunk_attention(q, k, v, w, idx, S), (q, k, v, w), do)
    full = [t.detach().float().requires_grad_() for t in (q, k, v, w)]
    ref = joint_chunk_attention_reference(*full[:3], full[3], idx, S)
    assert rel_err(joint_chunk_attention(q, k, v, w, idx, S), ref) < 1e-2
    for name, a, b in zip("qkvw", grads, torch.autograd.grad(ref, full, do.float())):
        assert rel_err(a, b) < 1e-2, name
    again = torch.autograd.grad(joint_chunk_attention(q, k, v, w, idx, S), (q, k, v, w), do)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))  # no atomics: bit-identical


@pytest.mark.parametrize("G", [16, 1])  # the token-centric and the chunk-centric kernels
def test_hsa_forward_backward_captures_in_a_cuda_graph_so_it_never_waits_on_the_host(G):
    """A host sync (or a shape read back from the GPU) anywhere in the forward, the index building or the
    backward makes CUDA-graph capture fail; replays must give the eager gradients, for new inputs too."""
    from benchmarks.kernels import captured, finish_selection, smooth_selection
    from hsa_lightning.kernels.hsa.parallel import hsa_attention

    torch.manual_seed(0)
    L, S, H, D, K = 8192, 64, 16, 64, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    idx, w = finish_selection(smooth_selection(L, K, H // G, gen, "cuda"), gen)
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, L, H // G, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w.requires_grad_()
    do = torch.randn_like(q)
    step = lambda: torch.autograd.grad(hsa_attention(q, k, v, w, idx, S), (q, k, v, w), do)  # noqa: E731
    replay, grads = captured(step)  # autotuning happens in its warm-up, outside the capture
    for _ in range(2):
        replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(grads, step()))
        with torch.no_grad():
            q.copy_(torch.randn_like(q))  # the replay reads the inputs' new values
            do.copy_(torch.randn_like(do))


def test_triton_forward_at_128k_matches_reference():
    from hsa_lightning.kernels.hsa.parallel import hsa_attention

    torch.manual_seed(1)
    L, S, H, D, K = 131072, 64, 16, 128, 32
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, L, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    n_vis = (torch.arange(L, device="cuda") // S).clamp_min(1)
    idx = (torch.rand(1, L, 1, K, device="cuda") * n_vis[None, :, None, None]).long()
    w = torch.softmax(torch.randn(1, L, 1, K, device="cuda"), -1)
    out = hsa_attention(q, k, v, w, idx, S)
    for t0 in (0, 65536, L - 2048):
        sl = slice(t0, t0 + 2048)
        ref = hsa_attention_reference(q[:, sl].float(), k.float(), v.float(), w[:, sl], idx[:, sl], S)
        assert rel_err(out[:, sl], ref) < 1e-2


def test_hsatriton_model_matches_reference_compiles_and_recomputes_the_same_selection():
    kw = dict(d_model=128, n_heads=8, hsa_kv_heads=1, chunk_size=64, window=64, top_k=4, gumbel_noise=True)
    ref = build_model("HSAReference", ("UltraLong", {"groups": 2}), **kw).eval()
    tri = copy.deepcopy(ref).to("cuda", torch.bfloat16)
    tri.blocks[2].backend = tri.blocks[3].backend = plugin("attention", "HSATriton")
    for m in tri.modules():  # the SWA modules share the backend object of their block
        if hasattr(m, "backend"):
            m.backend = tri.blocks[2].backend
    x = torch.randint(0, 64, (2, 300))
    eager = tri(x.cuda())
    assert rel_err(eager, ref(x)) < 3e-2
    compiled = torch.compile(tri)(x.cuda())
    assert rel_err(compiled, eager) < 1e-2
    # Activation checkpointing re-runs retrieval (with Gumbel noise) in backward: same selection, same grads.
    tri.train()

    def grads(checkpointed: bool):
        torch.manual_seed(5)
        h = tri.embed(x.cuda())
        pos = torch.arange(x.shape[1], device="cuda")
        memory = None
        for i, block in enumerate(tri.blocks):
            if i == tri.encoder_at:
                memory = tri.encoder(h)
            args = (h, pos, memory) if isinstance(block, HSABlock) else (h, pos)
            h = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False) if checkpointed else block(*args)
        return torch.autograd.grad(h.float().square().mean(), [p for p in tri.parameters()], allow_unused=True)

    plain, ckpt = grads(False), grads(True)
    for a, b in zip(plain, ckpt):
        if a is not None:
            assert torch.equal(a, b)


def test_fused_retrieval_on_cuda_matches_reference_selection():
    from hsa_lightning.kernels.retrieval import retrieval_scores, select_chunks
    from hsa_lightning.kernels.retrieval.parallel import select_chunks_fused

    torch.manual_seed(2)
    L, S, K, DR = 65536, 64, 32, 128
    q = torch.randn(1, L, 1, DR, device="cuda", dtype=torch.bfloat16)
    lmk = torch.randn(1, L // S, 1, DR, device="cuda", dtype=torch.bfloat16)
    idx, valid, sel = select_chunks_fused(q, lmk, K, S)
    scores = retrieval_scores(q, lmk, S)
    ref_idx, ref_valid = select_chunks(scores, K)
    assert torch.equal(valid, ref_valid)
    agree = (idx[..., :, None] == ref_idx[..., None, :]).any(-1)[valid].float().mean().item()
    assert agree > 0.995  # bf16 inputs: only near-ties may swap
    same = (idx == ref_idx) & valid
    torch.testing.assert_close(sel[same], torch.gather(scores, -1, ref_idx)[same], rtol=1e-3, atol=1e-3)


def test_hsatriton_model_trains_under_bf16_autocast():
    kw = dict(d_model=128, n_heads=8, hsa_kv_heads=1, chunk_size=64, window=64, top_k=4)
    torch.manual_seed(0)
    model = build_model("HSATriton", ("UltraLong", {"groups": 2}), dtype=torch.float32, **kw).cuda()
    x = torch.randint(0, 64, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        nll, n = model.loss(x, x)
    nll.backward()
    ref = build_model("HSAReference", ("UltraLong", {"groups": 2}), dtype=torch.float32, **kw).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_nll, _ = ref.loss(x, x)
    assert abs(nll.item() - ref_nll.item()) / ref_nll.item() < 1e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_moe_grouped_experts_bf16_on_cuda_match_fp32_and_repeat_exactly():
    from hsa_lightning.kernels.moe import parallel, routed_experts, routed_experts_reference

    torch.manual_seed(0)
    N, d, h, E, k = 2048, 256, 128, 16, 4
    x = torch.randn(N, d)
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    weights = torch.rand(N, k)
    ws = [torch.randn(E, d, h) / d**0.5, torch.randn(E, d, h) / d**0.5, torch.randn(E, h, d) / h**0.5]
    ref = routed_experts_reference(x[:256].double(), indices[:256], weights[:256].double(), *(w.double() for w in ws))
    cuda = [t.cuda() for t in (x, weights, *ws)]
    assert parallel._grouped_mm_supported(cuda[0].bfloat16())

    def run():
        leaves = [t.bfloat16().requires_grad_() for t in cuda]
        out, _, _ = routed_experts(leaves[0], indices.cuda(), *leaves[1:])
        out.float().square().sum().backward()
        return out, [t.grad for t in leaves]

    out, grads = run()
    assert rel_err(out[:256], ref) < 1e-2
    out2, grads2 = run()
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_inference_engine_on_cuda_matches_the_full_forward_and_offload_is_identical(monkeypatch):
    """bf16 HSATriton: segmented prefill (fused retrieval with query_start, Triton HSA over a strided
    cache prefix), suffix-only scoring and decode against one fp32 full forward; offload bit-identical,
    also with either HSA kernel family forced."""
    from hsa_lightning.inference import InferenceEngine
    from hsa_lightning.kernels.hsa import parallel

    ref = build_model("HSATriton", ("UltraLong", {"groups": 2}), dtype=torch.float32, vocab_size=256, d_model=256,
                      n_heads=8, head_dim=32, n_kv_heads=2, hsa_kv_heads=2, chunk_size=64, top_k=8, window=128,
                      ).to("cuda").eval()
    model = copy.deepcopy(ref).to(torch.bfloat16)
    x = torch.randint(0, 256, (2, 6000), device="cuda")
    with torch.no_grad():
        full = ref(x)
    kw = dict(max_tokens=6100, batch_size=2, segment_len=1024, progress=False)
    e = InferenceEngine(model, **kw)
    assert rel_err(e.prefill(x[:, :5990], last=None), full[:, :5990]) < 2e-2
    decoded = torch.stack([e.step(x[:, t]) for t in range(5990, 6000)], 1)
    assert rel_err(decoded, full[:, 5990:]) < 2e-2
    e.reset()
    assert rel_err(e.prefill(x, last=4), full[:, -4:]) < 2e-2
    off = InferenceEngine(model, offload=True, **kw)
    for by_chunk in (None, False, True):  # the backend's own choice, then each kernel family forced
        if by_chunk is not None:
            monkeypatch.setattr(parallel, "uses_chunk_kernels", lambda *args, _forced=by_chunk: _forced)
        e.reset()
        off.reset()
        assert torch.equal(off.prefill(x, last=None), e.prefill(x, last=None)), by_chunk
        tok = x[:, 0]
        assert torch.equal(off.step(tok), e.step(tok)), by_chunk
    monkeypatch.undo()
    # decode never waits on the host, also when a chunk completes (70 steps cross a chunk boundary)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(70):
            tok = e.step(tok).argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp1", "fsdp2"])
def test_strategies_on_two_gpus_follow_the_one_gpu_loss_curve(gpu_runs, strategy):
    from test_parallel import check_strategy_curve

    check_strategy_curve(*gpu_runs, strategy, accelerator="gpu")


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    from test_parallel import _curve, _fit, _initial_weights

    tmp = tmp_path_factory.mktemp("gpu_strategies")
    _initial_weights(tmp / "init.pt")
    return tmp, _curve(_fit(tmp, "single", accelerator="gpu"))


def test_compiled_and_checkpointed_units_match_eager_on_cuda():
    from hsa_lightning.lit.parallel import ParallelConfig, prepare

    ids = torch.randint(0, 64, (2, 1025), device="cuda")  # 1024 tokens: the FlexAttention path
    results = {}
    for name, parallel in (("eager", ParallelConfig()), ("compiled", ParallelConfig(compile=True)),
                           ("both", ParallelConfig(compile=True, activation_checkpointing=True))):
        model = prepare(build_model("HSATriton", ("UltraLong", {"groups": 2}), d_model=128, n_heads=4,
                                    head_dim=32, chunk_size=64, top_k=4, window=128, dtype=torch.float32).cuda(), parallel)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll, n = model.loss(ids[:, :-1], ids[:, 1:])
        (nll / n).backward()
        results[name] = (nll / n, torch.cat([p.grad.flatten() for p in model.parameters()]))
    for name in ("compiled", "both"):
        assert rel_err(results[name][0], results["eager"][0]) < 1e-2, name
        assert rel_err(results[name][1], results["eager"][1]) < 5e-2, name


def test_fused_lm_loss_on_cuda_matches_fp32_reference_under_bf16_autocast():
    from hsa_lightning.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    g = torch.Generator().manual_seed(0)
    h = torch.randn(5000, 256, generator=g).cuda().requires_grad_()
    w = (torch.randn(16384, 256, generator=g) * 0.05).cuda().requires_grad_()
    y = torch.randint(0, 16384, (5000,), generator=g).cuda()
    y[::7] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, y, 2048)
    want = linear_cross_entropy_reference(h, w, y)
    assert abs(got.item() - want.item()) / want.item() < 1e-2
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        assert a.dtype == torch.float32 and rel_err(a, b) < 2e-2


# D = 64 runs FLEX_BACKWARD_TILES (on compute capability 9), 128 FlexAttention's own tiles
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sliding_window_block_mask_on_cuda_gives_the_banded_attention_and_its_gradients(head_dim):
    from hsa_lightning.plugins.attention.hsa_triton import _flex_sliding_window

    q = torch.randn(1, 1024, 4, head_dim, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1024, 2, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(2))
    do = torch.randn(1, 1024, 4, head_dim, dtype=torch.float64)
    inputs = [t.detach().to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v)]
    q, k, v = (t.detach().double().cpu().requires_grad_() for t in inputs)  # the reference sees the same bf16 values
    out = _flex_sliding_window(*inputs, 300)
    want = naive_local_attention(q, k, v, 300)
    assert rel_err(out, want) < 1e-2
    got_grads = torch.autograd.grad(out, inputs, do.to("cuda", torch.bfloat16))
    for got, expected in zip(got_grads, torch.autograd.grad(want, (q, k, v), do)):
        assert rel_err(got, expected) < 2e-2
