"""Triton HSA kernels against the reference, on CPU through the Triton interpreter (fp32).

Cases: every group size 1..32, lengths not a multiple of the chunk, real selections from the retrieval
rule (few visible chunks, all-padding rows for the first chunk), many queries picking one chunk,
duplicate-free random selections. Relative error < 1e-4 on outputs and on q, k, v, w gradients.
"""
import pytest
import torch

from conftest import build_model
from hsa_lightning.kernels.hsa import hsa_attention_reference
from hsa_lightning.kernels.hsa import parallel
from hsa_lightning.kernels.hsa.parallel import block_union, chunk_csr, dkdv_work, hsa_attention
from hsa_lightning.kernels.retrieval import fusion_weights, retrieval_scores, select_chunks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run; the GPU file covers CUDA")


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def selection(kind, B, T, Hkv, C, S, K, g):
    if kind == "retrieval":  # the model's rule: visibility, clipping, padding slots, recency order
        q_slc, lmk = torch.randn(B, T, Hkv, 8, generator=g), torch.randn(B, C, Hkv, 8, generator=g)
        scores = retrieval_scores(q_slc, lmk, S)
        idx, valid = select_chunks(scores, K)
        return idx, fusion_weights(scores, idx, valid)
    if kind == "one_chunk":  # every query picks chunk 1 (and padding chunk 0 with weight 0)
        idx = torch.zeros(B, T, Hkv, K, dtype=torch.long)
        idx[..., 0] = 1
        w = torch.zeros(B, T, Hkv, K)
        w[..., 0] = 1.0
        return idx, w
    if kind == "all_padding":
        return torch.zeros(B, T, Hkv, K, dtype=torch.long), torch.zeros(B, T, Hkv, K)
    # duplicate-free uniform random selections over all chunks
    idx = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(B * T * Hkv)]).view(B, T, Hkv, K)
    return idx, torch.rand(B, T, Hkv, K, generator=g)


def check(B, T, H, Hkv, D, S, K, kind, seed=0, by_chunk=False):
    g = torch.Generator().manual_seed(seed)
    C = -(-T // S)
    q = torch.randn(B, T, H, D, generator=g).requires_grad_()
    k = torch.randn(B, C * S, Hkv, D, generator=g).requires_grad_()
    v = torch.randn(B, C * S, Hkv, D, generator=g).requires_grad_()
    idx, w = selection(kind, B, T, Hkv, C, S, K, g)
    w = w.detach().requires_grad_()
    out = hsa_attention(q, k, v, w, idx, S, by_chunk=by_chunk)
    ref = hsa_attention_reference(q, k, v, w, idx, S)
    if kind == "all_padding":
        assert out.abs().max() == 0
    else:
        assert rel(out, ref) < 1e-4
    do = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * do).sum(), (q, k, v, w))
    want = torch.autograd.grad((ref * do).sum(), (q, k, v, w))
    for name, a, b in zip("qkvw", got, want):
        if b.abs().max() == 0:
            assert a.abs().max() == 0, name
        else:
            assert rel(a, b) < 1e-4, f"d{name}: {rel(a, b)}"


KERNELS = pytest.mark.parametrize("by_chunk", [False, True], ids=["token_centric", "chunk_centric"])


@KERNELS
@pytest.mark.parametrize("G", [1, 2, 3, 4, 8, 16, 32])
def test_every_group_size(G, by_chunk):
    check(B=1, T=45, H=G * 2 if G <= 4 else G, Hkv=2 if G <= 4 else 1, D=16, S=16, K=3, kind="retrieval",
          by_chunk=by_chunk)


@KERNELS
@pytest.mark.parametrize("split_lists", [False, True], ids=["whole_lists", "split_lists"])
@pytest.mark.parametrize("kind", ["retrieval", "random", "one_chunk", "all_padding"])
def test_selection_patterns(kind, split_lists, by_chunk, monkeypatch):
    if split_lists:  # tiny work items: popular chunks are spread over several programs and reduced
        monkeypatch.setattr(parallel, "MIN_ENTRIES_PER_ITEM", 1)
    check(B=2, T=70, H=4, Hkv=1, D=32, S=16, K=4 if kind != "random" else 3, kind=kind, seed=1, by_chunk=by_chunk)


@KERNELS
def test_topk_above_visible_count_and_short_sequence(by_chunk):
    check(B=1, T=20, H=2, Hkv=1, D=16, S=16, K=8, kind="retrieval", by_chunk=by_chunk)


def test_chunk_centric_kernels_serve_small_groups_over_full_chunk_lists():
    q = torch.empty(1, 4096, 16, 128, device="meta", dtype=torch.bfloat16)
    assert parallel.uses_chunk_kernels(q, 4096, 1, 32) and parallel.uses_chunk_kernels(q, 4096, 4, 32)
    assert not parallel.uses_chunk_kernels(q, 4096, 8, 32)  # the token tile holds few tokens already
    assert not parallel.uses_chunk_kernels(q[:, :1], 1 << 20, 1, 32)  # decode: most chunks' lists are empty
    long = torch.empty(1, 1 << 17, 16, 128, device="meta", dtype=torch.bfloat16)
    assert parallel.uses_chunk_kernels(long, 1 << 17, 1, 32)  # 16 GiB of partial outputs: in slices
    assert parallel.chunk_kernel_slice(long, 32) == 1 << 16 and parallel.chunk_kernel_slice(q, 32) == 4096


@pytest.mark.parametrize("B", [1, 2])
def test_chunk_centric_kernels_run_long_sequences_in_query_slices(B, monkeypatch):
    # a partial-output budget of 4 tokens' worth: T = 45 runs as 12 slices of 4 tokens (the last one 1);
    # each slice's dK/dV is added by autograd, the result still the reference's
    monkeypatch.setattr(parallel, "CHUNK_PARTIALS_MAX_BYTES", 4 * B * 3 * 2 * 16 * 4)
    calls = []
    op = parallel._hsa_attention_op
    monkeypatch.setattr(parallel, "_hsa_attention_op", lambda q, *a: calls.append(q.shape[1]) or op(q, *a))
    check(B=B, T=45, H=2, Hkv=2, D=16, S=16, K=3, kind="retrieval", by_chunk=True)
    assert calls == [4] * 11 + [1]


def test_gradients_are_bitwise_reproducible():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 40, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 48, 1, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 48, 1, 16, generator=g, requires_grad=True)
    idx, w = selection("retrieval", 1, 40, 1, 3, 16, 2, g)
    w.requires_grad_()
    runs = [torch.autograd.grad(hsa_attention(q, k, v, w, idx, 16).square().sum(), (q, k, v, w)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_union_and_inverse_index_are_exact_and_linear_in_selections():
    idx = torch.tensor([[[[3, 1]], [[3, 0]], [[2, 0]]]])  # (B=1, T=3, Hkv=1, K=2)
    w = torch.tensor([[[[0.5, 0.5]], [[1.0, 0.0]], [[0.7, 0.3]]]])
    union, count = block_union(idx, 2)
    assert count.tolist() == [[[3, 2]]]
    assert union[0, 0, 0, :3].tolist() == [3, 1, 0] and union[0, 0, 1, :2].tolist() == [2, 0]
    assert union.numel() == idx.numel() + 2  # O(L*k): padded to the block, never O(L^2/S)
    entries, offsets = chunk_csr(idx, w, 4)
    per_chunk = {c: sorted(entries[0, 0, offsets[0, 0, c]:offsets[0, 0, c + 1]].tolist()) for c in range(4)}
    assert per_chunk == {0: [5], 1: [1], 2: [4], 3: [0, 2]}  # (token * K + slot); zero weights dropped


def test_dkdv_work_items_tile_every_chunk_list_exactly(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_ENTRIES_PER_ITEM", 1)
    counts = torch.tensor([0, 5, 1, 9])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).view(1, 1, 5).int()
    table, n_items, first, e, n_slots = dkdv_work(offsets, int(counts.sum()), 2)
    assert e == 2 and n_items.tolist() == [[[1, 3, 1, 5]]]
    rows = [r for r in table[0, 0].tolist() if r[0] >= 0]
    for c in range(4):  # items of a chunk cover its list [offsets[c], offsets[c+1]) in order, no overlap
        mine = [(s, t) for ch, s, t, _ in rows if ch == c]
        assert mine[0][0] == offsets[0, 0, c] and mine[-1][1] == offsets[0, 0, c + 1]
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
    slots = [sl for ch, _, _, sl in rows if n_items[0, 0, ch] > 1]
    assert slots == list(range(len(slots))) and len(slots) <= n_slots  # partials only for split chunks
    assert first.tolist() == [[[-1, 0, -1, 3]]]


@pytest.mark.parametrize("position_in_hsa", [False, True])
def test_model_with_hsatriton_matches_hsareference(position_in_hsa):
    ref = build_model("HSAReference", ("UltraLong", {"groups": 2}), dtype=torch.float32, chunk_size=16,
                      d_model=64, head_dim=16, n_heads=4, hsa_kv_heads=1, top_k=2, position_in_hsa=position_in_hsa)
    tri = build_model("HSATriton", ("UltraLong", {"groups": 2}), dtype=torch.float32, chunk_size=16,
                      d_model=64, head_dim=16, n_heads=4, hsa_kv_heads=1, top_k=2, position_in_hsa=position_in_hsa)
    tri.load_state_dict(ref.state_dict())
    x = torch.randint(0, 64, (2, 53))
    a, b = ref(x), tri(x)
    assert rel(b, a) < 1e-4
    ga = torch.autograd.grad(a.square().mean(), list(ref.parameters()))
    gb = torch.autograd.grad(b.square().mean(), list(tri.parameters()))
    assert max(rel(y, z) for y, z in zip(gb, ga) if z.abs().max() > 0) < 1e-3


def test_mixed_input_dtypes_are_cast_to_the_narrowest():
    """Under autocast the query can be 16-bit while normed keys stay fp32; the op must not mix them."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 40, 2, 16, generator=g)
    k, v = torch.randn(1, 48, 1, 16, generator=g), torch.randn(1, 48, 1, 16, generator=g)
    idx, w = selection("retrieval", 1, 40, 1, 3, 16, 2, g)
    out = hsa_attention(q.half(), k, v, w, idx, 16)
    assert out.dtype == torch.float16
    assert rel(out.float(), hsa_attention_reference(q, k, v, w, idx, 16)) < 1e-2
    assert [t.dtype for t in parallel.common_dtype(k, q.bfloat16(), k.double())] == [torch.bfloat16] * 3


def test_custom_ops_agree_with_their_fake_implementations():
    """What torch.compile traces: torch.library.opcheck runs the HSA op (whose forward also returns the
    chunk union the backward reuses) and the fused selection eagerly and on fake tensors, and checks their
    schemas, autograd registrations and AOT dispatch."""
    from hsa_lightning.kernels.retrieval import parallel as retrieval

    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, D, S, K = 1, 100, 4, 2, 16, 16, 3  # T not a multiple of S
    C = -(-T // S)
    q = torch.randn(B, T, H, D, generator=g, requires_grad=True)
    k = torch.randn(B, C * S, Hkv, D, generator=g, requires_grad=True)
    v = torch.randn(B, C * S, Hkv, D, generator=g, requires_grad=True)
    idx, w = selection("retrieval", B, T, Hkv, C, S, K, g)
    for by_chunk in (False, True):
        torch.library.opcheck(parallel._hsa_attention_op, (q, k, v, w.requires_grad_(), idx, S, 0.25, by_chunk))
    q_slc = torch.randn(B, T, Hkv, 16, generator=g, requires_grad=True)
    landmarks = torch.randn(B, C, Hkv, 16, generator=g, requires_grad=True)
    # (opcheck's AOT test sums every output into the first one's dtype, int64 indices here: it cannot run)
    torch.library.opcheck(retrieval._select_op, (q_slc, landmarks, K, S, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("T,window", [(512, 512), (1024, 100), (1024, 128), (2048, 300), (896, 1000), (384, 1)])
def test_sliding_window_block_mask_equals_flex_attentions_own(T, window):
    from torch.nn.attention.flex_attention import create_block_mask

    from hsa_lightning.plugins.attention.hsa_triton import sliding_window_block_mask

    got = sliding_window_block_mask(T, window, "cpu")
    want = create_block_mask(lambda b, h, q, k: (k <= q) & (q - k < window), None, None, T, T, device="cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.to_dense(), want.to_dense())  # the same tiles, partial and full
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    assert torch.equal(got.mask_mod(0, 0, q, k), want.mask_mod(0, 0, q, k))


def test_sliding_window_block_mask_compiles_without_a_graph_break():
    from hsa_lightning.plugins.attention.hsa_triton import sliding_window_block_mask

    @torch.compile(backend="aot_eager", fullgraph=True)
    def tiles(x):
        mask = sliding_window_block_mask(x.shape[0], 300, x.device)
        return mask.kv_num_blocks, mask.full_kv_indices

    counts, full = tiles(torch.zeros(1024))
    want = sliding_window_block_mask(1024, 300, "cpu")
    assert torch.equal(counts, want.kv_num_blocks) and torch.equal(full, want.full_kv_indices)


def test_cached_sliding_window_block_mask_first_built_in_inference_mode_can_be_saved_for_backward():
    # evaluation (inference mode) can be the first to build a shape's mask; training then reuses the cache
    from hsa_lightning.plugins.attention.hsa_triton import _cached_sliding_window_block_mask

    _cached_sliding_window_block_mask.cache_clear()
    with torch.inference_mode():
        mask = _cached_sliding_window_block_mask(640, 200, "cpu")
    assert mask is _cached_sliding_window_block_mask(640, 200, "cpu")
    tensors = [t for t in vars(mask).values() if isinstance(t, torch.Tensor)]
    assert tensors and not any(t.is_inference() for t in tensors)
