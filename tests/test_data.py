"""The synthetic corpus: deterministic, packed, with findable needles."""
import numpy as np
import pytest

from hsa_lightning.data.synthetic import NEEDLE, QUESTION, Haystack, needle_document, packed_block
from hsa_lightning.data.tokenizer import ByteTokenizer
from hsa_lightning.errors import ConfigError
from hsa_lightning.lit.synthetic_datamodule import SyntheticDataModule

TOK = ByteTokenizer()


def test_blocks_are_deterministic_per_index_and_packed_with_separators():
    hay = Haystack(0)
    a = packed_block(0, 0, 5, 256, 0.5, hay, TOK)
    assert np.array_equal(a, packed_block(0, 0, 5, 256, 0.5, Haystack(0), TOK))
    assert not np.array_equal(a, packed_block(0, 0, 6, 256, 0.5, hay, TOK))
    assert not np.array_equal(a, packed_block(0, 1, 5, 256, 0.5, hay, TOK))  # splits differ
    assert a.shape == (257,) and a.max() < TOK.vocab_size and a.min() >= 0
    blocks = [packed_block(0, 0, i, 256, 0.5, hay, TOK) for i in range(20)]
    assert sum((b == TOK.doc_sep).sum() for b in blocks) >= 10


@pytest.mark.parametrize("depth", [0.0, 0.33, 1.0])
def test_needle_present_once_answer_derivable_and_depth_placed(depth):
    rng = np.random.default_rng(3)
    doc = needle_document(rng, Haystack(0), TOK, 600, depth)
    text = TOK.decode(doc.tokens)
    needle = NEEDLE.format(key=doc.key)
    assert text.count(needle) == 1 and text.count(doc.key) == 2
    assert text.endswith(QUESTION + doc.key)
    assert TOK.decode(doc.tokens[doc.answer_start:]) == doc.key
    assert TOK.decode(doc.tokens[doc.needle_start:doc.needle_start + len(needle)]) == needle
    hay_len = len(doc.tokens) - len(needle) - len(QUESTION) - len(doc.key)
    assert abs(doc.needle_start - depth * hay_len) <= 1


def test_datamodule_batches_are_shifted_labels():
    dm = SyntheticDataModule(seq_len=64, batch_size=3, train_samples=6)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, 64)
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(seq_len=0), "data seq_len=0 must be >= 1"),
    (dict(needle_share=1.5), "data needle_share=1.5 must be within [0, 1]"),
    (dict(batch_size=-1), "data batch_size=-1 must be >= 1"),
])
def test_datamodule_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError) as err:
        SyntheticDataModule(**kwargs)
    assert str(err.value) == message
