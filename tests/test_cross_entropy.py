"""The fused LM loss against the plain cross-entropy of the full logits: values and gradients."""
import pytest
import torch

from hsa_lightning.kernels.cross_entropy import (linear_cross_entropy, linear_cross_entropy_reference,
                                                 logit_rows_reference_)
from hsa_lightning.kernels.cross_entropy.parallel import logit_rows_


def _inputs(n, d, v, seed, ignored=0.2):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = -100
    return h, w, y


@pytest.mark.parametrize("n,v,chunk", [(37, 50, 8), (16, 33, 16), (5, 7, 100), (24, 64, 1)])
def test_fused_loss_and_gradients_equal_the_reference(n, v, chunk):
    h, w, y = _inputs(n, 12, v, seed=n + v)
    got = linear_cross_entropy(h, w, y, chunk)
    want = linear_cross_entropy_reference(h, w, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.tensor(0.37)  # an upstream gradient, as (nll / n).backward() gives
    got_grads = torch.autograd.grad(got, (h, w), g)
    want_grads = torch.autograd.grad(want, (h, w), g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_label_ignored_gives_zero_loss_and_gradients():
    h, w, y = _inputs(9, 4, 10, seed=0, ignored=1.1)
    loss = linear_cross_entropy(h, w, y, 4)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_without_grad_it_only_scores():
    h, w, y = _inputs(20, 8, 30, seed=1)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, 6)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, w, y).detach(), rtol=1e-5, atol=1e-5)


def test_autocast_runs_the_matmuls_in_bf16_like_the_reference():
    h, w, y = _inputs(32, 16, 40, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, y, 8)
        want = linear_cross_entropy_reference(h, w, y)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    gh, gw = torch.autograd.grad(got, (h, w))
    rh, rw = torch.autograd.grad(want, (h, w))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run; test_gpu.py covers CUDA")
@pytest.mark.parametrize("n,v", [(6, 5000), (9, 37), (3, 4096)])  # several column blocks, one odd block
def test_triton_row_kernel_equals_the_reference(n, v):
    g = torch.Generator().manual_seed(v)
    logits = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    labels[0] = v - 1  # the last column
    got, want = logits.clone(), logits.clone()
    nll = logit_rows_(got, labels)
    torch.testing.assert_close(nll, logit_rows_reference_(want, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[1].abs().max() == 0
