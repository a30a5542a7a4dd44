"""Choosing the next token from logits: greedy, temperature, nucleus (top-p)."""
from __future__ import annotations

import torch

from hsa_lightning.errors import InferenceError


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. ``temperature`` 0 is greedy; otherwise sample from
    softmax(logits / temperature) restricted to the smallest set of tokens whose mass reaches ``top_p``."""
    if temperature < 0:
        raise InferenceError(f"temperature={temperature} must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise InferenceError(f"top_p={top_p} must be within (0, 1]")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep a token while the mass before it is below top_p (so the most likely one always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
