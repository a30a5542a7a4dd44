"""Text -> MDS shards: packing, manifest, atomic writes, tokenizers, and each bad input's error."""
import json
from pathlib import Path

import numpy as np
import pytest

from hsa_lightning.data.__main__ import main as data_main
from hsa_lightning.data.shards import read_manifest, write_shards
from hsa_lightning.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe
from hsa_lightning.errors import ConfigError

DOCS = [f"Doc {i}: " + "lorem ipsum dolor sit amet. " * (i % 7 + 1) + "Ünïcödé 1234567." for i in range(40)]


def write_jsonl(path: Path, docs, field="text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def read_blocks(folder: Path) -> np.ndarray:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    return np.stack([ds[i]["tokens"] for i in range(ds.size)]).astype(np.int64)


def expected_stream(tok, docs) -> list[int]:
    out = []
    for d in docs:
        out += tok.encode(d) + [tok.doc_sep]
    return out


def test_round_trip_packs_documents_into_blocks(tmp_path):
    tok = ByteTokenizer()
    a = write_jsonl(tmp_path / "a.jsonl", DOCS[:30])
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "b.txt").write_text(DOCS[30])
    (folder / "skip.bin").write_bytes(b"\x00\xff")  # not a text extension: ignored
    manifest = write_shards([str(a), str(folder)], tmp_path / "out", tok, block_len=64, progress=False)
    blocks = read_blocks(tmp_path / "out")
    stream = expected_stream(tok, DOCS[:31])

    assert blocks.shape == (manifest["samples"], 65)
    # consecutive blocks share one token (the last label is the next first input)
    assert (blocks[1:, 0] == blocks[:-1, -1]).all()
    inputs = blocks[:, :-1].reshape(-1)  # every stream token is an input exactly once, then padding
    n = len(stream)
    assert inputs[:n].tolist() == stream[: len(inputs[:n])]
    assert (blocks.reshape(-1)[-manifest["padding"]:] == tok.pad).all()
    assert manifest["tokens"] == n and manifest["documents"] == 31
    assert manifest["samples"] == -(-(n - 1) // 64)
    assert [s["documents"] for s in manifest["sources"]] == [30, 1]
    assert manifest["tokenizer"]["fingerprint"] == "byte:258"
    assert read_manifest(tmp_path / "out") == manifest


def test_output_is_atomic_and_never_overwritten_silently(tmp_path):
    tok = ByteTokenizer()
    good = write_jsonl(tmp_path / "a.jsonl", DOCS[:5])
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"valid start \xff\xfe not utf-8")
    with pytest.raises(ConfigError, match=r"b\.txt: not UTF-8 text \(invalid start byte at byte 12\)"):
        write_shards([str(good), str(bad)], tmp_path / "out", tok, block_len=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.txt"]  # no folder, no partial left

    write_shards([str(good)], tmp_path / "out", tok, block_len=16, progress=False)
    with pytest.raises(ConfigError, match=r"output '.*out' already exists; pass --overwrite to replace it"):
        write_shards([str(good)], tmp_path / "out", tok, block_len=16, progress=False)
    m = write_shards([str(good)], tmp_path / "out", tok, block_len=32, overwrite=True, progress=False)
    assert read_manifest(tmp_path / "out")["block_len"] == 32 == m["block_len"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.txt", "out"]


def test_atomic_file_replaces_only_when_complete(tmp_path):
    from hsa_lightning.data.atomic import atomic_file

    out = tmp_path / "sub" / "trace.gz"
    with atomic_file(out) as partial:
        partial.write_text("first")
    with pytest.raises(RuntimeError, match="cut off"):
        with atomic_file(out) as partial:
            partial.write_text("half of the second")
            raise RuntimeError("cut off")
    assert out.read_text() == "first" and [p.name for p in out.parent.iterdir()] == ["trace.gz"]


@pytest.mark.parametrize("case, message", [
    ("empty", r"holds no text: 2 documents, all empty"),
    ("missing", r"input '.*nothing\.txt' does not exist"),
    ("glob", r"input '.*\*\.none': the glob pattern matches no file"),
    ("badjson", r"bad\.jsonl:2: not a JSON object"),
    ("field", r"f\.jsonl:1: no string field 'text' \(set --text-field\)"),
])
def test_bad_corpus_errors(tmp_path, case, message):
    if case == "empty":
        inputs = [str(write_jsonl(tmp_path / "e.jsonl", ["", ""]))]
    elif case == "missing":
        inputs = [str(tmp_path / "nothing.txt")]
    elif case == "glob":
        inputs = [str(tmp_path / "*.none")]
    elif case == "badjson":
        (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
        inputs = [str(tmp_path / "bad.jsonl")]
    else:
        inputs = [str(write_jsonl(tmp_path / "f.jsonl", ["x"], field="body"))]
    with pytest.raises(ConfigError, match=message):
        write_shards(inputs, tmp_path / "out", ByteTokenizer(), block_len=16, progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_missing_and_incomplete_shard_folders(tmp_path):
    with pytest.raises(ConfigError, match=r"shard folder '.*nope' does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has no manifest\.json and index\.json: .* or that run did not finish"):
        read_manifest(tmp_path / "half")


def test_trained_bpe_splits_digits_and_round_trips(tmp_path):
    tok = train_bpe(iter(DOCS * 3), vocab_size=320, output=tmp_path / "tok" / "tokenizer.json")
    assert isinstance(tok, HFTokenizer) and 258 < tok.vocab_size <= 320  # a tiny corpus runs out of merges
    assert (tok.doc_sep, tok.pad) == (0, 1)
    text = "Needle 7654321 in Ünïcödé."
    assert tok.decode(tok.encode(text)) == text
    digits = [tok.decode([i]) for i in tok.encode("7654321")]
    assert digits == list("7654321")
    again = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    assert again.fingerprint == tok.fingerprint != ByteTokenizer().fingerprint
    assert tok.sentence_ends and all(tok.decode([i]).rstrip(" ").endswith((".", "!", "?", "\n"))
                                     for i in tok.sentence_ends)

    docs = write_jsonl(tmp_path / "a.jsonl", DOCS[:8])
    m = write_shards([str(docs)], tmp_path / "out", tok, block_len=32, progress=False)
    blocks = read_blocks(tmp_path / "out")
    stream = expected_stream(tok, DOCS[:8])
    assert blocks[:, :-1].reshape(-1)[: len(stream)].tolist() == stream
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint and m["dtype"] == "uint16"


def test_tokenizer_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer='gpt2' must be 'byte' or the path of a tokenizer\.json file"):
        load_tokenizer("gpt2")
    with pytest.raises(ConfigError, match=r"tokenizer file '.*missing\.json' does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"is not a valid tokenizer\.json"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_command_line(tmp_path, capsys):
    docs = write_jsonl(tmp_path / "a.jsonl", DOCS[:4])
    assert data_main(["prepare", str(docs), "-o", str(tmp_path / "out"), "--block-len", "32"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert data_main(["prepare", str(docs), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert "error: output" in capsys.readouterr().err
    assert data_main(["train-tokenizer", str(docs), "-o", str(tmp_path / "t.json"), "--vocab-size", "100"]) == 2
    assert "error: vocab_size=100 must be >= 300" in capsys.readouterr().err


def test_stream_tokens_rejoins_the_blocks_and_checks_the_tokenizer(tmp_path):
    """Evaluation reads a shard folder back as one stream (haystacks, held-out perplexity)."""
    from hsa_lightning.data.shards import stream_tokens

    tok = ByteTokenizer()
    write_shards([str(write_jsonl(tmp_path / "a.jsonl", DOCS[:12]))], tmp_path / "out", tok, block_len=32,
                 progress=False)
    assert stream_tokens(tmp_path / "out", tok).tolist() == expected_stream(tok, DOCS[:12])
    other = train_bpe(iter(DOCS), 300, tmp_path / "tok.json")
    with pytest.raises(ConfigError, match=r"shard folder '.*out' was written with tokenizer 'byte' \(byte:258\) but the "
                                          r"evaluation tokenizer is"):
        stream_tokens(tmp_path / "out", other)
