"""Scores and intervals of the evaluation suite.

- Teacher-forced exact match (the paper's protocol): a sample is right when the argmax at every answer
  position is the answer token (``answer_token_correct(...).all()``).
- RULER's ``string_match_all`` / ``string_match_part`` on greedy generations: case-insensitive substring
  containment of each reference, after RULER's post-processing (strip; control characters to newlines).
- 95% intervals: Wilson's score interval for a proportion; for fractional per-sample scores, the normal
  interval of the mean clipped to [0, 1].
"""
from __future__ import annotations

import math
import re

import torch

Z95 = 1.959963984540054


def answer_token_correct(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """(n,) bool: whether the argmax of ``logits`` (n, V) at each position is that ``answer`` (n,) token id."""
    return logits.argmax(-1) == answer


def ruler_postprocess(prediction: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip())


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of references found in the prediction (RULER's niah / vt metric, per sample, in [0, 1])."""
    p = ruler_postprocess(prediction).lower()
    return sum(r.lower() in p for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference is found in the prediction (RULER's QA metric, per sample)."""
    p = ruler_postprocess(prediction).lower()
    return float(any(r.lower() in p for r in references))


def wilson_interval(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(total: float, total_sq: float, n: int) -> tuple[float, float]:
    """95% normal interval of a mean of scores in [0, 1] from their sum and sum of squares, clipped."""
    if n == 0:
        return 0.0, 1.0
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
    half = Z95 * math.sqrt(var / n)
    return max(0.0, mean - half), min(1.0, mean + half)
