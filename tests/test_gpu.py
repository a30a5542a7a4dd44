"""CUDA checks (skipped without a GPU): bf16 models and attention against float64 CPU references."""
import copy

import pytest
import torch

from conftest import build_model, plugin
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
