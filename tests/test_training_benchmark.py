"""benchmarks/training.py's inputs: random ids, or the first tokens of a token stream (``--text``)."""
import pytest
import torch

from benchmarks.training import token_ids


def test_text_ids_are_the_streams_first_tokens_in_rows_of_length_plus_one():
    stream = torch.arange(100)
    ids = token_ids(3, 9, 1000, "cpu", stream)
    assert ids.tolist() == stream[:30].view(3, 10).tolist()


def test_random_ids_are_reproducible_and_inside_the_vocabulary():
    ids = token_ids(2, 63, 50, "cpu", None)
    assert ids.shape == (2, 64) and 0 <= ids.min() and ids.max() < 50
    assert torch.equal(ids, token_ids(2, 63, 50, "cpu", None))


def test_a_text_too_short_for_the_batch_is_refused_with_the_counts():
    with pytest.raises(SystemExit, match=r"--text holds 10 tokens; batch 2 x \(L 9 \+ 1\) needs 20"):
        token_ids(2, 9, 1000, "cpu", torch.arange(10))


def test_a_text_of_another_vocabulary_is_refused_before_it_reaches_the_embedding():
    with pytest.raises(SystemExit, match="--text holds token id 99, outside the model's vocab_size 50"):
        token_ids(2, 9, 50, "cpu", torch.arange(99, -1, -1))
