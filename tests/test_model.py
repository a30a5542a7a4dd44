"""Model-level behaviour: causality, the first chunk, padding, gradient paths, init."""
import pytest
import torch

from conftest import build_model

LAYOUTS = [
    ("UltraLong", {"groups": 1}),
    ("UltraLong", {"groups": 2}),
    ("Dense", {}),
    ("SWA", {}),
    ("Pattern", {"pattern": "S|HFH"}),
]


@pytest.mark.parametrize("attention", ["HSAReference", "Flash"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}{x[1]}")
def test_future_tokens_never_change_past_logits(attention, layout):
    model = build_model(attention, layout).eval()
    x = torch.randint(0, 64, (2, 43))
    base = model(x)
    for t in (0, 7, 8, 15, 16, 30):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, 64, y[:, t + 1:].shape)
        out = model(y)
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # the perturbation is visible later


@pytest.mark.parametrize("fusion", ["stick_breaking", "joint", "joint_scored", "softmax_and_union"])
@pytest.mark.parametrize("options", [{}, {"landmark": "mean", "recency_bias": True, "hsa_residual": "standard"},
                                     {"position_in_hsa": True}, {"read_successor": True},
                                     {"landmark": "mean_shifted", "hsa_residual": "standard"}])
def test_causality_holds_for_hsa_options(fusion, options):
    model = build_model(fusion=fusion, **options).eval()
    x = torch.randint(0, 64, (1, 40))
    y = x.clone()
    y[:, 20:] = (y[:, 20:] + 1) % 64
    torch.testing.assert_close(model(y)[:, :20], model(x)[:, :20], rtol=0, atol=1e-12)


@pytest.mark.parametrize("attention", ["HSAReference", "Flash"])
def test_first_chunk_equals_model_with_hsa_output_forced_to_zero(attention, monkeypatch):
    model = build_model(attention, ("UltraLong", {"groups": 2})).eval()
    x = torch.randint(0, 64, (2, 32))
    normal = model(x)
    backend = model.blocks[2].backend
    monkeypatch.setattr(backend, "memory_attention", lambda q, memory, selection: torch.zeros_like(q))
    zeroed = model(x)
    S = model.config.chunk_size
    torch.testing.assert_close(normal[:, :S], zeroed[:, :S], rtol=0, atol=0)
    assert not torch.allclose(normal[:, S:], zeroed[:, S:])


@pytest.mark.parametrize("attention", ["HSAReference", "Flash"])
def test_length_not_a_multiple_of_chunk_size_matches_longer_input(attention):
    model = build_model(attention).eval()
    x = torch.randint(0, 64, (2, 48))
    for T in (1, 5, 9, 37):
        torch.testing.assert_close(model(x[:, :T]), model(x)[:, :T], rtol=0, atol=1e-12)


def test_retrieval_learns_only_through_the_fusion_weights(monkeypatch):
    from hsa_lightning.model.retrieval import Retrieval

    def grads(detach_weights: bool):
        model = build_model(layout=("UltraLong", {"groups": 2}))
        if detach_weights:
            original = Retrieval.forward

            def detached(self, *args):
                sel = original(self, *args)
                sel.weights = sel.weights.detach()
                return sel

            monkeypatch.setattr(Retrieval, "forward", detached)
        x = torch.randint(0, 64, (2, 40))
        nll, n = model.loss(x, x)
        nll.backward()
        monkeypatch.undo()
        retrieval = [model.blocks[i].retrieval.proj.weight.grad for i in (2, 3)]
        return retrieval, model.encoder.landmark_proj.weight.grad

    retrieval, landmark = grads(detach_weights=False)
    assert all(g.abs().sum() > 0 for g in retrieval) and landmark.abs().sum() > 0
    retrieval, landmark = grads(detach_weights=True)
    assert all(g is None or g.abs().sum() == 0 for g in retrieval)
    assert landmark is None or landmark.abs().sum() == 0


def test_backends_share_parameters_so_checkpoints_swap():
    hsa, flash = build_model("HSAReference"), build_model("Flash", seed=1)
    flash.load_state_dict(hsa.state_dict(), strict=True)
    x = torch.randint(0, 64, (1, 8))  # no visible chunk yet: both backends agree
    torch.testing.assert_close(hsa(x), flash(x))


def test_loss_is_mean_token_nll_and_ignores_minus_100():
    model = build_model(loss_chunk_tokens=7)
    x = torch.randint(0, 64, (2, 20))
    labels = x.roll(-1, 1)
    labels[:, -3:] = -100
    nll, n = model.loss(x, labels)
    expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 reduction="sum")
    assert n == 2 * 17
    torch.testing.assert_close(nll.double(), expected.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [("UltraLong", {"groups": 2}), ("Dense", {})], ids=str)
def test_every_param_owning_module_resets_and_meta_build_materialises(layout):
    eager = build_model(layout=layout, dtype=torch.float32, recency_bias=True)
    for name, module in eager.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert hasattr(module, "reset_parameters"), f"{name} ({type(module).__name__}) owns parameters"
    with torch.device("meta"):
        meta = build_model(layout=layout, dtype=torch.float32, recency_bias=True)
    meta.to_empty(device="cpu")
    for module in meta.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.reset_parameters()
    for (name, a), (_, b) in zip(eager.named_parameters(), meta.named_parameters()):
        assert torch.isfinite(b).all(), name
        if b.ndim == 1 or b.numel() == 1:  # norms start at one, biases/recency at zero, CLS is random
            if "cls" not in name:
                torch.testing.assert_close(a, b, msg=name)
        else:
            assert abs(a.std().item() - b.std().item()) < 0.25 * a.std().item(), name
    x = torch.randint(0, 64, (1, 24))
    assert torch.isfinite(meta(x)).all()


@pytest.mark.parametrize("attention", ["HSAReference", "Flash", "HSATriton"])
def test_masked_documents_do_not_see_each_other(attention):
    """With doc_start, a document packed after another (chunk-aligned) gives the logits it gives alone,
    and whatever precedes a document (any length) never changes its logits."""
    from hsa_lightning.lit.streaming_datamodule import document_starts

    dtype = torch.float32 if attention == "HSATriton" else torch.float64
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    model = build_model(attention, ("UltraLong", {"groups": 2}), dtype=dtype, chunk_size=16, top_k=2, window=12,
                        head_dim=16, retrieval_dim=16)
    SEP = 63
    doc = torch.randint(0, 63, (1, 57))
    for first_len in (32, 21):  # 32: doc aligned to chunk starts, so it equals doc alone
        first = torch.randint(0, 63, (1, first_len))
        first[0, -1] = SEP
        packed = torch.cat([first, doc], 1)
        starts = document_starts(packed, SEP)
        assert starts[0, first_len:].eq(first_len).all() and starts[0, :first_len].eq(0).all()
        out = model(packed, starts)[:, first_len:]
        other = torch.randint(0, 63, (1, first_len))
        other[0, -1] = SEP
        assert torch.equal(document_starts(torch.cat([other, doc], 1), SEP), starts)
        torch.testing.assert_close(model(torch.cat([other, doc], 1), starts)[:, first_len:], out, **tol)
        if first_len == 32:  # RoPE tables are float32, so shifted positions agree to ~1e-8 only
            torch.testing.assert_close(model(doc), out, rtol=1e-4, atol=1e-6)
    unmasked = model(packed)[:, first_len:]  # without the mask the first document does leak in
    assert not torch.allclose(unmasked, out, **tol)


def test_rope_table_keeps_float64_angles_and_is_an_opaque_op():
    """cos/sin come from float64 angles even at 16M positions; relative positions are all that matter;
    the table is a custom op (its fake implementation checked), so torch.compile never fuses its float64
    trigonometry into every element of q and k."""
    from hsa_lightning.plugins.position.rope import RoPE, rope_table

    positions = torch.tensor([0, 1, 4095, 16_000_000])
    cos, sin = rope_table(positions, 8, 10000.0)
    angles = positions.double()[:, None] * 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)
    torch.testing.assert_close(cos, angles.cos().float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(sin, angles.sin().float(), rtol=0, atol=1e-7)
    torch.library.opcheck(rope_table, (positions, 8, 10000.0))
    rope, q, k = RoPE(), torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(p_q, p_k):
        return (rope.rotate(q, torch.tensor([p_q])) * rope.rotate(k, torch.tensor([p_k]))).sum()

    torch.testing.assert_close(dot(5, 2), dot(1_000_005, 1_000_002), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dot(5, 2), dot(5, 3), rtol=1e-3)


def test_shifted_landmarks_pool_the_tokens_one_position_earlier_across_calls():
    """``landmark="mean_shifted"``: chunk c's landmark is the projected mean of the normalised tokens at
    cS-1 .. cS+S-2 (a zero row before the sequence); built in two calls with the hidden state before the
    second, it equals the one-call memory (the inference engine builds it chunk by chunk)."""
    model = build_model(landmark="mean_shifted").eval()
    enc, S = model.encoder, model.config.chunk_size
    h = torch.randn(2, 4 * S + 3, model.config.d_model, dtype=torch.float64)
    whole = enc(h)
    tokens = torch.cat([torch.zeros_like(h[:, :1]), enc.out_norm(h)], 1)  # index p + 1 holds position p
    for c in range(4):
        want = enc.landmark_proj(tokens[:, c * S:(c + 1) * S].mean(1)).view(2, model.config.hsa_kv_heads, -1)
        torch.testing.assert_close(whole.landmarks[:, c], want, rtol=1e-12, atol=1e-12)
    plain = build_model(landmark="mean").eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain.encoder(h).landmarks[:, :4], whole.landmarks[:, :4])  # the shift is real
    later = enc(h[:, 2 * S:], 2 * S, h[:, 2 * S - 1:2 * S])
    torch.testing.assert_close(later.landmarks[:, :2], whole.landmarks[:, 2:4], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(later.k[:, :2 * S], whole.k[:, 2 * S:4 * S], rtol=0, atol=0)


def test_position_in_hsa_rotates_hsa_queries_and_memory_keys_by_relative_position():
    """With RoPE inside HSA, the memory built from a sequence starting at ``start`` and queries moved by the
    same offset give the same HSA output (only relative positions count); without it HSA ignores positions,
    so an offset memory is the same memory, and the option changes what the model computes."""
    model = build_model(position_in_hsa=True).eval()
    block = next(b for b in model.blocks if type(b).__name__ == "HSABlock")
    h = torch.randn(1, 40, model.config.d_model, dtype=torch.float64)
    at0, at64 = model.encoder(h), model.encoder(h, 64)
    torch.testing.assert_close(at0.v, at64.v, rtol=0, atol=0)
    torch.testing.assert_close(at0.landmarks, at64.landmarks, rtol=0, atol=0)
    assert not torch.allclose(at0.k, at64.k)
    positions = torch.arange(40)
    out0 = block(h, positions, at0)
    torch.testing.assert_close(block(h, positions + 64, at64), out0, rtol=1e-5, atol=1e-6)  # float32 RoPE tables
    assert not torch.allclose(block(h, positions, at64), out0)  # a key offset alone changes the output
    plain = build_model(position_in_hsa=False).eval()
    torch.testing.assert_close(plain.encoder(h, 64).k, plain.encoder(h).k, rtol=0, atol=0)
    assert not torch.allclose(plain(torch.arange(40)[None] % 64), model(torch.arange(40)[None] % 64))
