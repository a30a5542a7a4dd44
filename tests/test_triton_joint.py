"""The joint-softmax fusion kernels (``kernels/hsa/joint.py``) against the reference, on CPU through the
Triton interpreter (fp32), with the slot mask (fusion ``joint``) and with fusion weights (``joint_scored``):
group sizes 1..32, lengths not a multiple of the chunk, padding slots, rows without any real slot, a chunk
picked in two slots, many queries picking one chunk, split chunk lists. Relative error < 1e-4 on outputs
and on q, k, v and weight gradients."""
import pytest
import torch

from conftest import build_model
from hsa_lightning.kernels.hsa import joint_chunk_attention_reference
from hsa_lightning.kernels.hsa import joint, parallel
from hsa_lightning.kernels.hsa.joint import joint_chunk_attention
from test_triton_hsa import rel, selection

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run; the GPU file covers CUDA")


def inputs(B, T, H, Hkv, D, S, K, kind, seed, scored=False):
    g = torch.Generator().manual_seed(seed)
    C = -(-T // S)
    q = torch.randn(B, T, H, D, generator=g).requires_grad_()
    k = torch.randn(B, C * S, Hkv, D, generator=g).requires_grad_()
    v = torch.randn(B, C * S, Hkv, D, generator=g).requires_grad_()
    if kind == "duplicates":  # random picks, then slot 1 repeats slot 0's chunk: the reference counts it twice
        idx, w = selection("random", B, T, Hkv, C, S, K, g)
        idx[..., 1] = idx[..., 0]
    else:
        idx, w = selection(kind, B, T, Hkv, C, S, K, g)
    w = w if scored else (w > 0).to(w.dtype)  # joint_scored: the fusion weights; joint: the slot mask
    return q, k, v, w.detach().requires_grad_(), idx, g


def check(B, T, H, Hkv, D, S, K, kind, seed=0, scored=False):
    q, k, v, w, idx, g = inputs(B, T, H, Hkv, D, S, K, kind, seed, scored)
    out = joint_chunk_attention(q, k, v, w, idx, S)
    ref = joint_chunk_attention_reference(q, k, v, w, idx, S)
    empty = ~(w > 0).any(-1)  # (B, T, Hkv): rows with nothing to attend to
    assert not out.view(B, T, Hkv, -1)[empty].any()
    if kind == "all_padding":
        assert empty.all()
    else:
        assert rel(out, ref) < 1e-4
    do = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * do).sum(), (q, k, v, w))
    want = torch.autograd.grad((ref * do).sum(), (q, k, v, w))
    for name, a, b in zip("qkvw", got, want):
        if b.abs().max() == 0:
            assert a.abs().max() == 0, name
        else:  # a row with one real chunk has dw = 0 exactly (its shift cancels): float32 noise on both sides
            err = (a - b).norm().item()
            assert err < 1e-4 * b.norm().item() + 1e-6 * b.numel() ** 0.5, f"d{name}: {err} vs {b.norm().item()}"


SCORED = pytest.mark.parametrize("scored", [False, True], ids=["joint", "joint_scored"])


@SCORED
@pytest.mark.parametrize("G", [1, 2, 3, 4, 8, 16, 32])
def test_every_group_size(G, scored):
    check(B=1, T=45, H=G * 2 if G <= 4 else G, Hkv=2 if G <= 4 else 1, D=16, S=16, K=3, kind="retrieval",
          scored=scored)


@SCORED
@pytest.mark.parametrize("split_lists", [False, True], ids=["whole_lists", "split_lists"])
@pytest.mark.parametrize("kind", ["retrieval", "random", "duplicates", "one_chunk", "all_padding"])
def test_selection_patterns(kind, split_lists, scored, monkeypatch):
    if split_lists:  # tiny work items: popular chunks are spread over several programs and reduced
        monkeypatch.setattr(parallel, "MIN_ENTRIES_PER_ITEM", 1)
    check(B=2, T=70, H=4, Hkv=1, D=32, S=16, K=4 if kind not in ("random", "duplicates") else 3, kind=kind, seed=1,
          scored=scored)


def test_topk_above_visible_count_and_short_sequence():
    check(B=1, T=20, H=2, Hkv=1, D=16, S=16, K=8, kind="retrieval")


def test_gradients_are_bitwise_reproducible():
    q, k, v, w, idx, _ = inputs(1, 40, 4, 1, 16, 16, 2, "retrieval", seed=3, scored=True)
    runs = [torch.autograd.grad(joint_chunk_attention(q, k, v, w, idx, 16).square().sum(), (q, k, v, w))
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_custom_op_agrees_with_its_fake_implementation():
    q, k, v, w, idx, _ = inputs(1, 100, 4, 2, 16, 16, 3, "retrieval", seed=0, scored=True)  # T % S != 0
    torch.library.opcheck(joint._joint_op, (q, k, v, w, idx, 16, 0.25))


@pytest.mark.parametrize("fusion,options", [("joint", {}), ("joint_scored", {}),
                                            ("joint_scored", {"read_successor": True}),  # duplicate chunks
                                            ("softmax_and_union", {})], ids=str)  # both kernel families, averaged
def test_model_with_joint_fusion_on_hsatriton_matches_hsareference(fusion, options):
    kw = dict(dtype=torch.float32, chunk_size=16, d_model=64, head_dim=16, n_heads=4, hsa_kv_heads=1, top_k=2,
              fusion=fusion, **options)
    ref = build_model("HSAReference", ("UltraLong", {"groups": 2}), **kw)
    tri = build_model("HSATriton", ("UltraLong", {"groups": 2}), **kw)
    tri.load_state_dict(ref.state_dict())
    x = torch.randint(0, 64, (2, 53))
    a, b = ref(x), tri(x)
    assert rel(b, a) < 1e-4
    ga = torch.autograd.grad(a.square().mean(), list(ref.parameters()), allow_unused=True)
    gb = torch.autograd.grad(b.square().mean(), list(tri.parameters()), allow_unused=True)
    assert [y is None for y in ga] == [z is None for z in gb]  # the same parameters get no gradient
    assert max(rel(z, y) for y, z in zip(ga, gb) if y is not None and y.abs().max() > 0) < 1e-3
