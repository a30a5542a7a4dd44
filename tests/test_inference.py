"""The inference engine against one full forward: segmented prefill, decode, suffix-only, offload, generate."""
import pytest
import torch

from conftest import build_model
from hsa_lightning.errors import InferenceError
from hsa_lightning.inference import InferenceEngine
from hsa_lightning.inference.sampling import sample_next

LAYOUTS = [
    ("UltraLong", {"groups": 1}),
    ("UltraLong", {"groups": 2}),
    ("Dense", {}),
    ("SWA", {}),
    ("Pattern", {"pattern": "S|HFH"}),  # a full-attention block after the encoder: no suffix-only path
]


def engine(model, max_tokens=128, batch_size=2, segment_len=16, **kw):
    return InferenceEngine(model, max_tokens=max_tokens, batch_size=batch_size, segment_len=segment_len,
                           progress=False, **kw)


@pytest.mark.parametrize("attention", ["HSAReference", "Flash", "HSAReference+position_in_hsa"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}{x[1]}")
def test_segmented_prefill_then_decode_equals_full_forward(attention, layout):
    attention, _, option = attention.partition("+")
    model = build_model(attention, layout, **({option: True} if option else {})).eval()
    x = torch.randint(0, 64, (2, 77))  # 9 chunks of 8 and a partial one
    full = model(x)
    for segment_len in (5, 8, 77):  # misaligned, chunk-aligned, one segment
        e = engine(model, segment_len=segment_len)
        torch.testing.assert_close(e.prefill(x, last=None), full, rtol=0, atol=1e-12)
    e = engine(model, segment_len=7)
    head = e.prefill(x[:, :30], last=None)
    decoded = torch.stack([e.step(x[:, t]) for t in range(30, 77)], 1)  # every later position, one at a time
    torch.testing.assert_close(torch.cat([head, decoded], 1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fusion,options", [("stick_breaking", {}), ("joint", {}), ("joint_scored", {}),
                                            ("joint_scored", {"read_successor": True}), ("softmax_and_union", {}),
                                            ("softmax", {"landmark": "mean_shifted"})],
                         ids=str)
@pytest.mark.parametrize("offload", [False, True])
def test_every_fusion_prefills_and_decodes_as_the_full_forward(fusion, options, offload):
    model = build_model("HSAReference", ("UltraLong", {"groups": 2}), fusion=fusion, **options).eval()
    x = torch.randint(0, 64, (2, 77))
    full = model(x)
    e = engine(model, segment_len=5, offload=offload)
    head = e.prefill(x[:, :40], last=None)
    decoded = torch.stack([e.step(x[:, t]) for t in range(40, 77)], 1)
    torch.testing.assert_close(torch.cat([head, decoded], 1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}{x[1]}")
def test_suffix_only_scoring_is_exact_and_skips_the_upper_decoder(layout, monkeypatch):
    model = build_model("HSAReference", layout).eval()
    x = torch.randint(0, 64, (2, 120))
    full = model(x)
    e = engine(model, segment_len=16)
    seen = []
    upper = e._upper
    monkeypatch.setattr(e, "_upper", lambda h: seen.append(h.shape[1]) or upper(h))
    got = e.prefill(x, last=3)
    torch.testing.assert_close(got, full[:, -3:], rtol=0, atol=1e-12)
    if e.suffix_ok:  # windows of 6: R = (upper attentions) x 5 positions of warm-up
        assert sum(seen) == 3 + e.receptive < 120
    else:
        assert sum(seen) == 120
    # decoding after a suffix-only prefill continues exactly
    nxt = torch.randint(0, 64, (2, 1))
    torch.testing.assert_close(e.step(nxt[:, 0]), model(torch.cat([x, nxt], 1))[:, -1], rtol=0, atol=1e-12)


def test_token_nll_matches_cross_entropy_of_the_full_forward():
    model = build_model("HSAReference").eval()
    x = torch.randint(0, 64, (2, 70))
    logp = torch.log_softmax(model(x).float(), -1)
    want = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    torch.testing.assert_close(engine(model).token_nll(x), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(engine(model).token_nll(x, last=9), want[:, -9:], rtol=1e-6, atol=1e-6)


def test_offloaded_chunk_memory_gives_the_same_logits():
    model = build_model("HSAReference", ("UltraLong", {"groups": 2})).eval()
    x = torch.randint(0, 64, (2, 90))
    resident = engine(model, segment_len=11)
    offloaded = engine(model, segment_len=11, offload=True)
    torch.testing.assert_close(offloaded.prefill(x, last=None), resident.prefill(x, last=None), rtol=0, atol=0)
    tok = torch.randint(0, 64, (2,))
    torch.testing.assert_close(offloaded.step(tok), resident.step(tok), rtol=0, atol=0)
    assert offloaded.store.kv.device.type == "cpu" and not hasattr(offloaded.store, "k")


def test_hsatriton_engine_matches_full_forward_with_fused_retrieval_offsets(monkeypatch):
    """Segments of 64 tokens take the fused retrieval with query_start > 0 (interpreter on CPU); offload
    gives the same bits with either HSA kernel family."""
    from hsa_lightning.kernels.hsa import parallel

    model = build_model("HSATriton", ("UltraLong", {"groups": 2}), dtype=torch.float32, chunk_size=16,
                        d_model=64, head_dim=16, n_heads=4, hsa_kv_heads=1, top_k=2, window=20).eval()
    x = torch.randint(0, 64, (1, 150))
    full = model(x)
    e = engine(model, max_tokens=160, batch_size=1, segment_len=64)
    out = torch.cat([e.prefill(x[:, :148], last=None), e.step(x[:, 148])[:, None], e.step(x[:, 149])[:, None]], 1)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    # Two rows: offload gathers the union of both rows' chunks, more K/V than one row's memory, so
    # choosing the kernel family by the K/V passed in would differ between offloaded and resident.
    x = torch.randint(0, 64, (2, 150))
    e, off = (engine(model, max_tokens=160, batch_size=2, segment_len=64, offload=o) for o in (False, True))
    for by_chunk in (None, False, True):  # the backend's own choice, then each kernel family forced
        if by_chunk is not None:
            monkeypatch.setattr(parallel, "uses_chunk_kernels", lambda *args, _forced=by_chunk: _forced)
        torch.testing.assert_close(off.prefill(x, last=None), e.prefill(x, last=None), rtol=0, atol=0)
        e.reset()
        off.reset()


def test_moe_model_prefill_equals_full_forward():
    model = build_model("HSAReference", ("UltraLong", {"groups": 1}),
                        ffn=("MoE", {"experts": 4, "active": 2, "expert_hidden": 16})).eval()
    x = torch.randint(0, 64, (2, 50))
    # the router runs in float32 whatever the model dtype, so agreement is float32-level
    torch.testing.assert_close(engine(model, segment_len=9).prefill(x, last=None), model(x), rtol=0, atol=1e-6)


def test_generate_greedy_equals_argmax_of_the_full_forward_and_stops():
    model = build_model("HSAReference").eval()
    prompt = torch.randint(0, 64, (2, 21))
    e = engine(model, max_tokens=64)
    out = e.generate(prompt, max_new_tokens=12)
    seq = prompt
    for _ in range(12):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == seq[:, 21:].tolist()
    stop = out[0][4]
    stopped = e.generate(prompt, max_new_tokens=12, stop_tokens=[stop])
    assert stopped[0] == out[0][: out[0].index(stop)]
    assert stopped[1] == (out[1][: out[1].index(stop)] if stop in out[1] else out[1])


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    model = build_model("HSAReference").eval()
    prompt = torch.randint(0, 64, (2, 10))
    e = engine(model, max_tokens=64)
    a = e.generate(prompt, 8, temperature=1.0, top_p=0.9, seed=3)
    assert a == e.generate(prompt, 8, temperature=1.0, top_p=0.9, seed=3)
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    # softmax mass: 0.72, 0.27, ...: top_p 0.5 keeps only the first, 0.9 the first two
    draws = {sample_next(logits, 1.0, 0.5).item() for _ in range(50)}
    assert draws == {0}
    draws = {sample_next(logits, 1.0, 0.9).item() for _ in range(200)}
    assert draws == {0, 1}
    assert sample_next(logits).item() == 0


def test_errors_name_the_limit():
    model = build_model("HSAReference").eval()
    with pytest.raises(InferenceError, match=r"a prompt of 60 tokens plus max_new_tokens=10 exceeds max_tokens=64"):
        engine(model, max_tokens=64).generate(torch.zeros(2, 60, dtype=torch.long), 10)
    e = engine(model, max_tokens=32)
    with pytest.raises(InferenceError, match=r"40 more tokens after position 0 exceed max_tokens=32"):
        e.prefill(torch.zeros(2, 40, dtype=torch.long))
    with pytest.raises(InferenceError, match=r"input has batch 1 but the engine was built for batch_size=2"):
        e.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(InferenceError, match=r"a cache for max_tokens=1000000 \(batch 2\) needs 0\.\d\d GiB on cpu "
                                             r"\(chunk_kv .* GiB\) but memory_budget_gib=0\.001 is 0\.00 GiB; "
                                             r"offload=True moves the chunk K/V"):
        engine(model, max_tokens=1_000_000, memory_budget_gib=0.001)
    with pytest.raises(InferenceError, match=r"offload=True needs a backend that selects chunks; Flash attends"):
        engine(build_model("Flash").eval(), offload=True)
    with pytest.raises(InferenceError, match=r"segment_len=0 must be >= 1"):
        engine(model, segment_len=0)


def test_backend_without_incremental_capability_is_refused():
    from hsa_lightning.plugins.attention.hsa_reference import HSAReference

    class OldBackend(HSAReference):
        incremental = False

    model = build_model("HSAReference").eval()
    model.backend = OldBackend()
    with pytest.raises(InferenceError, match=r"attention backend OldBackend does not support incremental inference"):
        engine(model)
