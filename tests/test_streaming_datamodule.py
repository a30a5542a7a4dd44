"""StreamingDataModule: token-exact batches, packing invariants, mixing, synthetic share, resume, errors."""
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from hsa_lightning.data.shards import write_shards
from hsa_lightning.data.tokenizer import ByteTokenizer, train_bpe
from hsa_lightning.errors import ConfigError
from hsa_lightning.lit.streaming_datamodule import StreamingDataModule, cut_blocks, inject_tasks

from conftest import ROOT, child_env

TOK = ByteTokenizer()


def corpus(tmp_path: Path, name: str, docs: list[str], block_len: int, tokenizer=TOK) -> Path:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    write_shards([str(src)], tmp_path / name, tokenizer, block_len=block_len, progress=False)
    return tmp_path / name


def prose(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the river runs past old mills and quiet farms under a grey sky".split()
    return [" ".join(rng.choice(words, int(rng.integers(20, 400)))).capitalize() + "." for _ in range(n)]


def epoch(dm: StreamingDataModule, inject: bool = False):
    dm.setup("fit")
    for raw in dm.train_dataloader():
        seqs, piece_ids = cut_blocks(raw["tokens"], raw["sample_ids"], dm.seq_len)
        yield raw, dm.make_batch(raw["tokens"], raw["sample_ids"], inject=inject), piece_ids


def test_epoch_is_token_exact_and_covers_every_token_once(tmp_path):
    docs = prose(60)
    folder = corpus(tmp_path, "c", docs, block_len=128)
    dm = StreamingDataModule(train=str(folder), seq_len=64, tokens_per_batch=256, synthetic_share=0, num_workers=0)
    pieces = {}
    for raw, batch, piece_ids in epoch(dm):
        assert batch["input_ids"].shape == (4, 64) == batch["labels"].shape  # 2 blocks of 128 -> 4 x 64
        for row, (sid, piece) in enumerate(piece_ids.tolist()):
            assert (sid, piece) not in pieces  # nothing duplicated
            pieces[(sid, piece)] = (batch["input_ids"][row], batch["labels"][row])
    n_blocks = json.loads((folder / "manifest.json").read_text())["samples"]
    assert sorted(pieces) == [(s, p) for s in range(n_blocks) for p in range(2)]  # nothing lost
    inputs = torch.cat([pieces[k][0] for k in sorted(pieces)])
    labels = torch.cat([pieces[k][1] for k in sorted(pieces)])
    stream = []
    for d in docs:
        stream += TOK.encode(d) + [TOK.doc_sep]
    n = len(stream)
    assert inputs[:n].tolist() == stream  # token-exact, separators between documents
    assert labels[: n - 1].tolist() == stream[1:]  # every label is the next token
    assert (inputs[n:] == TOK.pad).all() and (labels[n - 1:] == -100).all()  # padding is never scored
    assert int((inputs == TOK.doc_sep).sum()) == len(docs)


def test_seq_len_change_keeps_tokens_per_batch(tmp_path):
    folder = corpus(tmp_path, "c", prose(30), block_len=128)
    dm = StreamingDataModule(train=str(folder), seq_len=128, tokens_per_batch=256, synthetic_share=0, num_workers=0)
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    long = dm.make_batch(raw["tokens"], raw["sample_ids"])
    dm.seq_len = 32
    short = dm.make_batch(raw["tokens"], raw["sample_ids"])
    assert long["input_ids"].shape == (2, 128) and short["input_ids"].shape == (8, 32) and dm.batch_size == 8
    assert torch.equal(long["input_ids"].reshape(-1), short["input_ids"].reshape(-1))
    with pytest.raises(ConfigError, match=r"data seq_len=48 must divide tokens_per_batch=256"):
        dm.seq_len = 48
    with pytest.raises(ConfigError, match=r"data seq_len=256 must divide the shards' block_len=128"):
        dm.seq_len = 256


def test_streams_mix_by_proportion(tmp_path):
    a = corpus(tmp_path, "a", ["a" * 5000] * 40, block_len=128)  # ~1560 blocks each
    b = corpus(tmp_path, "b", ["b" * 5000] * 40, block_len=128)
    dm = StreamingDataModule(train=[{"local": str(a), "proportion": 0.8}, {"local": str(b), "proportion": 0.2}],
                             seq_len=128, tokens_per_batch=512, synthetic_share=0, num_workers=0)
    firsts = torch.cat([raw["tokens"][:, 1] for raw, _, _ in epoch(dm)])
    share_a = float((firsts == ord("a")).float().mean())
    assert len(firsts) > 1000 and abs(share_a - 0.8) < 0.03, share_a
    with pytest.raises(ConfigError, match=r"data train: set proportion on every stream or on none"):
        StreamingDataModule(train=[{"local": str(a), "proportion": 0.8}, {"local": str(b)}])


def test_synthetic_share_and_samples(tmp_path):
    text = torch.tensor(TOK.encode(" ".join(prose(40))))
    seqs = text.repeat(16)[: 600 * 1025].reshape(600, 1025)
    piece_ids = torch.stack([torch.arange(600), torch.zeros(600, dtype=torch.int64)], 1)
    out, chosen = inject_tasks(seqs, piece_ids, TOK, 0.2, ["s_niah", "mq_niah", "vt"], seed=3)
    again, chosen_again = inject_tasks(seqs, piece_ids, TOK, 0.2, ["s_niah", "mq_niah", "vt"], seed=3)
    assert torch.equal(out, again) and chosen == chosen_again  # a pure function of the seed and ids
    hit = [c is not None for c in chosen]
    assert abs(sum(hit) / 600 - 0.2) < 0.05
    assert {c for c in chosen if c} == {"s_niah", "mq_niah", "vt"}
    for row, task in enumerate(chosen):
        if task is None:
            assert torch.equal(out[row], seqs[row])
            continue
        text_out = TOK.decode(out[row].tolist())
        questions = {"s_niah": "What is the special magic number for long-context", "vt": "Find all variables",
                     "mq_niah": "What are all the special magic numbers for"}
        assert questions[task] in text_out and not torch.equal(out[row], seqs[row])


def test_resume_mid_epoch_one_process(tmp_path):
    _check_resume(tmp_path, devices=1)


def test_resume_mid_epoch_with_loader_workers(tmp_path):
    _check_resume(tmp_path, devices=1, workers=2)  # workers prefetch ahead of what the trainer consumed


def test_resume_mid_epoch_two_processes(tmp_path):
    _check_resume(tmp_path, devices=2)


def _check_resume(tmp_path: Path, devices: int, workers: int = 0) -> None:
    folder = corpus(tmp_path, "c", prose(150), block_len=512)
    script = ROOT / "tests" / "scripts" / "record_batches.py"
    env = child_env()

    def run(out: str, *extra: str) -> list[list]:
        cmd = [sys.executable, str(script), str(folder), str(tmp_path / out), "--steps", "9",
               "--devices", str(devices), "--workers", str(workers), *extra]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads((tmp_path / f"{out}.rank{r}.json").read_text()) for r in range(devices)]

    full = run("full")
    run("part", "--save-at", "4", str(tmp_path / "ckpt"))
    resumed = run("resumed", "--resume", str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    for rank in range(devices):
        assert [s for s, _ in resumed[rank]] == list(range(4, 9))
        assert resumed[rank] == full[rank][4:]  # exactly the batches the uninterrupted run saw
    if devices == 2:  # ranks read disjoint blocks
        assert not {d for _, d in full[0]} & {d for _, d in full[1]}


def test_bad_configuration_errors(tmp_path):
    folder = corpus(tmp_path, "c", prose(20), block_len=128)
    with pytest.raises(ConfigError, match=r"shard folder '.*missing' does not exist"):
        StreamingDataModule(train=str(tmp_path / "missing"), seq_len=64, tokens_per_batch=128).setup("fit")
    with pytest.raises(ConfigError, match=r"data seq_len=96 must divide the shards' block_len=128"):
        StreamingDataModule(train=str(folder), seq_len=96, tokens_per_batch=192, synthetic_share=0).setup("fit")
    with pytest.raises(ConfigError, match=r"data tokens_per_batch=64 must be a multiple of the shards' block_len=128"):
        StreamingDataModule(train=str(folder), seq_len=64, tokens_per_batch=64, synthetic_share=0).setup("fit")
    with pytest.raises(ConfigError, match=r"data tokens_per_batch=100 must be a positive multiple of seq_len=64"):
        StreamingDataModule(train=str(folder), seq_len=64, tokens_per_batch=100)
    with pytest.raises(ConfigError, match=r"data seq_len=128 is too short for synthetic task 's_niah'"):
        StreamingDataModule(train=str(folder), seq_len=128, tokens_per_batch=128).setup("fit")
    with pytest.raises(ConfigError, match=r"data synthetic_tasks=\['niah'\]: choose from s_niah, mq_niah, mv_niah, vt, passkey, niah_single_2"):
        StreamingDataModule(train=str(folder), synthetic_tasks=["niah"])

    bpe = train_bpe(iter(prose(50)), 300, tmp_path / "tok.json")
    with pytest.raises(ConfigError, match=r"shard folder '.*c' was written with tokenizer 'byte' \(byte:258, "
                                          r"vocab_size=258\) but data tokenizer='.*tok\.json' is hf:300:"):
        StreamingDataModule(train=str(folder), tokenizer=str(tmp_path / "tok.json"), seq_len=64,
                            tokens_per_batch=128, synthetic_share=0).setup("fit")
    assert bpe.vocab_size == 300


def test_document_starts_follow_separators(tmp_path):
    folder = corpus(tmp_path, "c", prose(30), block_len=128)
    dm = StreamingDataModule(train=str(folder), seq_len=64, tokens_per_batch=256, synthetic_share=0,
                             num_workers=0, mask_documents=True)
    for _, batch, _ in epoch(dm):
        for ids, starts in zip(batch["input_ids"].tolist(), batch["doc_start"].tolist()):
            expected, start = [], 0
            for t in range(len(ids)):
                if t and ids[t - 1] == TOK.doc_sep:
                    start = t
                expected.append(start)
            assert starts == expected


def test_model_trains_on_shards_and_checks_them(tmp_path):
    from hsa_lightning.lit.module import HSALitModule
    from hsa_lightning.model.attention_backend import AttentionBackend

    folder = corpus(tmp_path, "c", prose(40), block_len=128)
    val = corpus(tmp_path, "v", prose(8, seed=1), block_len=128)
    config = dict(vocab_size=258, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, hsa_kv_heads=1,
                  chunk_size=16, top_k=2, window=32)

    def fit(seq_len: int, mask_documents=False, attention="HSAReference", **model_overrides) -> L.Trainer:
        dm = StreamingDataModule(train=str(folder), val=str(val), seq_len=seq_len, tokens_per_batch=256,
                                 synthetic_share=0, num_workers=0, mask_documents=mask_documents)
        module = HSALitModule(config={**config, **model_overrides}, attention=attention,
                              layout={"class_path": "UltraLong", "init_args": {"groups": 1}})
        trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=2, val_check_interval=3,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=dm)
        return trainer

    trainer = fit(64)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    masked = fit(64, mask_documents=True)
    assert torch.isfinite(masked.callback_metrics["val/loss"])
    assert masked.callback_metrics["val/loss"] != trainer.callback_metrics["val/loss"]

    class NoMask(AttentionBackend):
        def memory_attention(self, q, memory, selection):
            return torch.zeros_like(q)

    with pytest.raises(ConfigError, match=r"data mask_documents=true needs an attention backend that masks "
                                          r"documents; NoMask does not"):
        fit(64, mask_documents=True, attention=NoMask())
    with pytest.raises(ConfigError, match=r"data seq_len=32 is not a multiple of model config.chunk_size=64"):
        fit(32, chunk_size=64, window=64)
    with pytest.raises(ConfigError, match=r"vocab_size=258 but model config.vocab_size=200"):
        fit(64, vocab_size=200)


def test_remote_stream_is_cached_locally(tmp_path):
    remote = corpus(tmp_path, "remote", prose(30), block_len=128)  # a folder works as streaming's remote
    dm = StreamingDataModule(train=[{"local": str(tmp_path / "cache"), "remote": str(remote)}], seq_len=64,
                             tokens_per_batch=256, synthetic_share=0, num_workers=0)
    seen = sum(raw["tokens"].shape[0] for raw, _, _ in epoch(dm))
    blocks = json.loads((remote / "manifest.json").read_text())["samples"]
    assert seen == blocks - blocks % 2  # whole batches of 2 blocks
    assert {p.name for p in (tmp_path / "cache").iterdir()} >= {"manifest.json", "index.json", "shard.00000.mds"}
    bad = StreamingDataModule(train=[{"local": str(tmp_path / "c2"), "remote": str(tmp_path / "none")}],
                              seq_len=64, tokens_per_batch=256, synthetic_share=0)
    with pytest.raises(ConfigError, match=r"cannot fetch manifest\.json of remote stream '.*none'"):
        bad.setup("fit")


def test_stale_shared_memory_is_removed_only_for_our_folders_and_dead_owners(tmp_path):
    from streaming.base.constant import BARRIER, LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _get_path, _pack_locals

    from hsa_lightning.lit.streaming_datamodule import _remove_stale_shared_memory

    def exists(name):
        return (Path("/dev/shm") / name).exists()

    free = next(p for p in range(1000) if not any(exists(_get_path(p + i, LOCALS)) for i in range(3)))
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    # a crashed run left segments for our folder (prefix free) and another folder (free + 1); nobody
    # maps them. On Linux a POSIX shared-memory segment is a file in /dev/shm.
    for prefix, dirs in ((free, [ours]), (free + 1, [theirs])):
        (Path("/dev/shm") / _get_path(prefix, LOCALS)).write_bytes(_pack_locals(dirs, prefix))
        (Path("/dev/shm") / _get_path(prefix, BARRIER)).write_bytes(bytes(8))
    # a live run on our folder (this process maps it): must survive
    data = _pack_locals([ours], free + 2)
    live = [SharedMemory(_get_path(free + 2, LOCALS), True, len(data), auto_cleanup=False)]
    live[0].buf[: len(data)] = data
    try:
        _remove_stale_shared_memory([ours])
        assert not exists(_get_path(free, LOCALS)) and not exists(_get_path(free, BARRIER))  # stale, ours
        assert exists(_get_path(free + 1, LOCALS)) and exists(_get_path(free + 1, BARRIER))  # another folder
        assert exists(_get_path(free + 2, LOCALS))  # ours but alive
    finally:
        live[0].shm.close()
        for prefix in (free, free + 1, free + 2):
            for name in (LOCALS, BARRIER):
                (Path("/dev/shm") / _get_path(prefix, name)).unlink(missing_ok=True)


@pytest.mark.parametrize("races", [1, 5])
def test_a_job_starting_at_the_same_time_on_the_host_costs_a_retry_not_the_run(tmp_path, monkeypatch, races):
    # mosaicml/streaming#901: a job looks for a free shared-memory prefix, another job creates it, and the
    # first job's create fails. Replayed: "another job" holds prefix P, and our first `races` lookups find P.
    import streaming.base.shared.prefix as prefix_mod
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory

    from hsa_lightning.lit import streaming_datamodule as sdm

    taken = next(p for p in range(1000) if not (Path("/dev/shm") / prefix_mod._get_path(p, LOCALS)).exists())
    data = prefix_mod._pack_locals([str(tmp_path / "other_job")], taken)
    other = SharedMemory(prefix_mod._get_path(taken, LOCALS), True, len(data), auto_cleanup=False)
    other.buf[: len(data)] = data
    real, lookups = prefix_mod._check_and_find_retrying, []

    def stale_lookup(*args, **kwargs):
        lookups.append(1)
        return taken if len(lookups) <= races * len(SHM_TO_CLEAN) else real(*args, **kwargs)

    monkeypatch.setattr(prefix_mod, "_check_and_find_retrying", stale_lookup)
    monkeypatch.setattr(sdm.time, "sleep", lambda s: None)
    streams = [sdm.StreamSpec(local=str(corpus(tmp_path, "c", prose(4), block_len=64)))]
    try:
        if races < sdm.SHM_PREFIX_ATTEMPTS:
            dataset = sdm._make_dataset(streams, batch_size=1, shuffle=False, seed=0)
            assert dataset._shm_prefix_int != taken and len(dataset) > 0
        else:
            with pytest.raises(RuntimeError) as info:
                sdm._make_dataset(streams, batch_size=1, shuffle=False, seed=0)
            assert str(info.value) == (
                f"streaming's shared memory '/{prefix_mod._get_path(taken, LOCALS)}' was created by another job "
                "starting at the same time on this host (mosaicml/streaming#901); start jobs on one host a few "
                "seconds apart")
    finally:
        other.shm.close()
        other.shm.unlink()
