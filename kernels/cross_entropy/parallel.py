"""The LM loss without a (tokens, vocabulary) logit tensor and with one head pass fewer.

The loss is the model's last operation, so its gradients can be computed during the forward: for each
slice of tokens, the logits are built, one Triton pass per row turns them into the row's NLL and, in
place, its gradient (softmax - one-hot), and two matmuls give the slice's gradients of the hidden
states and of the head weight. Backward only scales them by the incoming gradient. Against a
checkpointed slice loop this saves the recomputed logit matmul and, per slice, the dozens of small
operations (or compiled-graph calls) that left the GPU waiting on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hsa_lightning.kernels.cross_entropy.naive import IGNORE_INDEX, logit_rows_reference_

BLOCK_V = 4096  # vocabulary columns per step of the row kernel


@triton.jit
def _logit_rows_kernel(LOGITS, LABELS, NLL, stride, V, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: log-sum-exp (online over column blocks), NLL, then the gradient in place."""
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride
    label = tl.load(LABELS + row)
    m = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    scored = label != IGNORE
    target = tl.load(base + label, mask=scored, other=0.0).to(tl.float32)
    tl.store(NLL + row, tl.where(scored, lse - target, 0.0))
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        ok = cols < V
        x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(base + cols, tl.where(scored, g, 0.0).to(LOGITS.dtype.element_ty), mask=ok)


def logit_rows_(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logit_rows_reference_`` through the Triton kernel (CUDA, or the interpreter on CPU)."""
    n, v = logits.shape
    nll = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n:
        _logit_rows_kernel[(n,)](logits, labels, nll, logits.stride(0), v, IGNORE=IGNORE_INDEX,
                                 BLOCK=min(BLOCK_V, triton.next_power_of_2(v)), num_warps=8)
    return nll


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _slices(h, w, labels, chunk_tokens, with_grad):
    """NLL sum; with ``with_grad`` also d(NLL sum)/dh (h's compute dtype) and d/dw (float32)."""
    nll = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    dh = torch.empty_like(h) if with_grad else None
    dw = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if with_grad else None
    for a in range(0, h.shape[0], chunk_tokens):
        b = min(a + chunk_tokens, h.shape[0])
        logits = h[a:b] @ w.t()
        # logits now hold their gradient (the CPU takes the reference, which the interpreter would slow)
        nll[a:b] = (logit_rows_ if logits.is_cuda else logit_rows_reference_)(logits, labels[a:b])
        if with_grad:
            torch.mm(logits, w, out=dh[a:b])
            dw += (logits.t() @ h[a:b]).float()
    return nll.sum(), dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            total, dh, dw = _slices(hidden.to(dtype), weight.to(dtype), labels, chunk_tokens, True)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return (dh * grad).to(ctx.dtypes[0]), (dw * grad).to(ctx.dtypes[1]), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int = 2048) -> torch.Tensor:
    """Same value and gradients as ``linear_cross_entropy_reference`` (hidden (N, d), weight (V, d),
    labels (N,) in [0, V) or -100), holding the logits of ``chunk_tokens`` rows at a time. Under autocast
    the matmuls run in the autocast dtype, the softmax in float32; labels are not range-checked."""
    labels = labels.contiguous()
    dtype = _compute_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _slices(hidden.to(dtype), weight.to(dtype), labels, chunk_tokens, False)[0]
