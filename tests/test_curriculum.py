"""Curriculum stages: boundaries, what each stage sets, constant tokens per step, self-copy, resume."""
import json

import lightning as L
import pytest
import torch

from conftest import plugin
from hsa_lightning.errors import ConfigError
from hsa_lightning.lit.curriculum_callback import Curriculum
from hsa_lightning.model.attention import SelfAttention
from hsa_lightning.model.retrieval import Retrieval


def test_stage_boundaries_and_validation():
    cur = Curriculum([{"class_path": "ShortWindowWarmup", "init_args": {"steps": 3}},
                      {"class_path": "Pretrain", "init_args": {"steps": 2}}, "Anneal"])
    assert [cur.stage_at(s)[0] for s in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert cur.stage_at(4) == (1, 0.5)
    with pytest.raises(ConfigError, match=r"curriculum stage 0 \(Pretrain\) needs steps: only the last stage"):
        Curriculum(["Pretrain", "Anneal"])
    with pytest.raises(ConfigError, match=r"curriculum stage Stage top_k=0 must be >= 1 or 'all'"):
        plugin("curriculum", "Stage", top_k=0)
    with pytest.raises(ConfigError, match=r"Anneal final_lr_scale=2.0 must be within \[0, lr_scale=1.0\]"):
        plugin("curriculum", "Anneal", final_lr_scale=2.0)
    anneal = plugin("curriculum", "Anneal", steps=10, lr_scale=0.5, final_lr_scale=0.1)
    assert anneal.lr_scale_at(0.0) == 0.5 and anneal.lr_scale_at(1.0) == pytest.approx(0.1)


def test_self_copy_doubles_the_first_half_with_matching_labels():
    x = torch.arange(1, 9).repeat(2, 1)  # tokens 1..8, labels 2..9
    doc_start = torch.tensor([0, 0, 0, 0, 4, 4, 4, 4]).repeat(2, 1)  # a document starts mid-sequence
    batch = {"input_ids": x, "labels": x + 1, "doc_start": doc_start}
    out = plugin("curriculum", "SelfCopy").transform(batch)
    assert out["input_ids"][0].tolist() == [1, 2, 3, 4, 1, 2, 3, 4]
    assert out["labels"][0].tolist() == [2, 3, 4, 1, 2, 3, 4, 5]
    assert out["doc_start"].tolist() == [[0] * 8] * 2  # the copy sees across the split
    copy_only = plugin("curriculum", "SelfCopy", score="copy").transform(batch)
    assert copy_only["input_ids"][0].tolist() == [1, 2, 3, 4, 1, 2, 3, 4]
    assert copy_only["labels"][0].tolist() == [-100, -100, -100, -100, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match=r"curriculum stage SelfCopy score='half' must be 'both' or 'copy'"):
        plugin("curriculum", "SelfCopy", score="half")


def test_self_copy_share_copies_only_the_first_rows():
    x = torch.arange(1, 9).repeat(4, 1) + 10 * torch.arange(4)[:, None]
    batch = {"input_ids": x, "labels": x + 1, "doc_start": torch.tensor([0, 0, 0, 0, 4, 4, 4, 4]).repeat(4, 1)}
    out = plugin("curriculum", "SelfCopy", score="copy", copy_share=0.5).transform(batch)
    assert out["input_ids"][:2].tolist() == [[1, 2, 3, 4, 1, 2, 3, 4], [11, 12, 13, 14, 11, 12, 13, 14]]
    assert out["labels"][1].tolist() == [-100, -100, -100, -100, 12, 13, 14, 15]
    assert torch.equal(out["input_ids"][2:], x[2:]) and torch.equal(out["labels"][2:], x[2:] + 1)
    assert out["doc_start"][:2].eq(0).all() and torch.equal(out["doc_start"][2:], batch["doc_start"][2:])
    assert torch.equal(batch["input_ids"], x)  # the input batch is left as it was
    odd = plugin("curriculum", "SelfCopy", copy_share=0.5).transform({"input_ids": x[:, :7], "labels": x[:, :7] + 1})
    assert odd["input_ids"][0].tolist()[:6] == [1, 2, 3, 1, 2, 3] and odd["labels"][0].tolist() == [2, 3, 1, 2, 3, 4, -100]
    with pytest.raises(ConfigError, match=r"curriculum stage SelfCopy copy_share=0 must be within \(0, 1\]"):
        plugin("curriculum", "SelfCopy", copy_share=0)


class Recorder(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        windows = sorted({m.window for m in module.model.modules() if isinstance(m, SelfAttention) and m.causal})
        top_k = {m.top_k for m in module.model.modules() if isinstance(m, Retrieval)}
        self.seen.append({"step": trainer.global_step, "shape": list(batch["input_ids"].shape), "windows": windows,
                          "top_k": sorted(top_k, key=str), "lr_scale": module.lr_scale,
                          "lr": trainer.optimizers[0].param_groups[0]["lr"]})


def _fit(tmp_path, shards, stages, steps, ckpt=None, save_every=None, seq_len=64):
    from hsa_lightning.lit.module import HSALitModule
    from hsa_lightning.lit.streaming_datamodule import StreamingDataModule

    L.seed_everything(0)
    dm = StreamingDataModule(train=str(shards), seq_len=seq_len, tokens_per_batch=256, synthetic_share=0,
                             num_workers=0)
    module = HSALitModule(config=dict(vocab_size=258, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1,
                                      chunk_size=16, top_k=2, window=32),
                          layout={"class_path": "UltraLong", "init_args": {"groups": 1}},
                          optim={"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"})
    recorder = Recorder()
    callbacks = [Curriculum(stages), recorder]
    if save_every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_every,
                                                             save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=bool(save_every),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return recorder.seen


STAGES = [{"class_path": "ShortWindowWarmup", "init_args": {"steps": 2, "window": 8}},
          {"class_path": "Pretrain", "init_args": {"steps": 2}},
          {"class_path": "LongContextMidtrain", "init_args": {"steps": 2, "seq_len": 128}},
          {"class_path": "Anneal", "init_args": {"final_lr_scale": 0.0, "steps": 4}}]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from hsa_lightning.data.shards import write_shards
    from hsa_lightning.data.tokenizer import ByteTokenizer

    tmp = tmp_path_factory.mktemp("cur")
    (tmp / "a.jsonl").write_text("".join(json.dumps({"text": f"Document {i}. " + "word " * 300}) + "\n"
                                         for i in range(30)))
    write_shards([str(tmp / "a.jsonl")], tmp / "shards", ByteTokenizer(), block_len=128, progress=False)
    return tmp / "shards"


def test_stages_set_window_top_k_length_and_lr(tmp_path, shards):
    seen = _fit(tmp_path, shards, STAGES, steps=10)
    assert [s["step"] for s in seen] == list(range(10))
    assert all(s["shape"][0] * s["shape"][1] == 256 for s in seen)  # tokens per step constant
    warm, pre, mid, anneal = seen[0:2], seen[2:4], seen[4:6], seen[6:10]
    assert all(s["windows"] == [8] and s["top_k"] == [None] and s["shape"] == [4, 64] for s in warm)
    assert all(s["windows"] == [32] and s["top_k"] == [2] and s["shape"] == [4, 64] for s in pre)
    assert all(s["windows"] == [32] and s["top_k"] == [None] and s["shape"] == [2, 128] for s in mid)
    assert [s["lr_scale"] for s in anneal] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert all(s["shape"] == [4, 64] for s in anneal)  # back to the data module's own length
    assert anneal[-1]["lr"] < anneal[0]["lr"]


def test_resume_re_enters_the_stage(tmp_path, shards):
    full = _fit(tmp_path / "a", shards, STAGES, steps=8)
    _fit(tmp_path / "b", shards, STAGES, steps=8, save_every=5)
    resumed = _fit(tmp_path / "c", shards, STAGES, steps=8, ckpt=str(tmp_path / "b" / "ckpt" / "epoch=0-step=5.ckpt"))
    assert [s["step"] for s in resumed] == [5, 6, 7]
    assert resumed == full[5:]  # same stage settings, shapes and learning rates as the uninterrupted run


def test_stage_needing_a_resizable_data_module(tmp_path):
    from hsa_lightning.lit.module import HSALitModule
    from hsa_lightning.lit.synthetic_datamodule import SyntheticDataModule

    module = HSALitModule(config=dict(vocab_size=258, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1,
                                      chunk_size=16, top_k=2, window=32))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Curriculum([{"class_path": "Stage",
                                                                           "init_args": {"seq_len": 128}}])])
    with pytest.raises(ConfigError, match=r"curriculum stage Stage sets seq_len or synthetic_share, but data "
                                          r"module SyntheticDataModule cannot change them"):
        trainer.fit(module, SyntheticDataModule(seq_len=64, batch_size=2))


def test_a_stage_on_new_data_starts_from_the_previous_stage_weights(tmp_path, shards):
    from hsa_lightning.lit.module import HSALitModule

    _fit(tmp_path / "a", shards, [{"class_path": "Pretrain"}], steps=3, save_every=3)
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=3.ckpt"
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    config = dict(vocab_size=258, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, chunk_size=16, top_k=2, window=32)
    layout = {"class_path": "UltraLong", "init_args": {"groups": 1}}
    module = HSALitModule(config=config, layout=layout, init_weights=str(ckpt))
    module.configure_model()
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, saved[f"model.{name}"]), name
    wrong = HSALitModule(config={**config, "d_model": 64}, layout=layout, init_weights=str(ckpt))
    with pytest.raises(ConfigError, match=r"init_weights='.*' does not match this model"):
        wrong.configure_model()
    with pytest.raises(ConfigError, match=r"init_weights='.*nothing.ckpt' is not a readable Lightning checkpoint"):
        HSALitModule(config=config, layout=layout, init_weights=str(tmp_path / "nothing.ckpt")).configure_model()
