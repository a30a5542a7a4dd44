"""The evaluation suite: task generators, scorers, intervals, and end-to-end runs of `cli.py test`."""
import json
import re

import numpy as np
import pytest

from conftest import ROOT, run_cli
from hsa_lightning.data.synthetic import Haystack
from hsa_lightning.data.tasks import TASKS
from hsa_lightning.data.tokenizer import ByteTokenizer
from hsa_lightning.errors import ConfigError
from hsa_lightning.eval.datamodule import Cell, LengthEvalData
from hsa_lightning.eval.scoring import (answer_token_correct, mean_interval, string_match_all, string_match_part,
                                        wilson_interval)

TOK = ByteTokenizer()
HAY = np.asarray(TOK.encode(Haystack(0).text(np.random.default_rng(1), 20_000)), dtype=np.int64)


def sample(task, length=3000, seed=0, depth=None):
    return TASKS[task](TOK, HAY, length, np.random.default_rng(seed), depth=depth)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_is_exact_length_with_each_needle_once_and_the_answer_at_the_end(task):
    for seed in range(5):
        s = sample(task, seed=seed)
        assert len(s.tokens) == 3000 and s.answer_end == 3000
        text = TOK.decode(s.tokens.tolist())
        answer = TOK.decode(s.tokens[s.answer_start:].tolist())
        assert all(a in answer for a in s.answers)
        # every answer is stated in the context before the question
        context = TOK.decode(s.tokens[: s.answer_start].tolist())
        for a in s.answers:
            assert context.count(a) >= 1
        for start, end in zip(s.needle_starts, s.needle_ends):  # needles sit where the sample says, each once
            assert text.count(TOK.decode(s.tokens[start:end].tolist())) == 1


def test_paper_tasks_answers_are_derivable_from_their_needles():
    s = sample("s_niah", seed=3)
    key = s.tokens[s.answer_start:].tolist()
    assert len(key) == 7 and all(100 <= k < 256 for k in key)
    needle = TOK.encode(" |One of the special magic numbers for long-context is:") + key + TOK.encode("|")
    hits = [i for i in range(len(s.tokens)) if s.tokens[i:i + len(needle)].tolist() == needle]
    assert hits == s.needle_starts  # the key appears in exactly one needle
    n = len(needle) - len(key) - 1
    assert s.answer_sources == list(range(hits[0] + n, hits[0] + n + 7))  # what each answer token copies
    passkey = sample("passkey", seed=7)
    assert s.tokens[s.answer_sources].tolist() == key and passkey.answer_sources[0] > passkey.needle_starts[0]
    assert passkey.tokens[passkey.answer_sources].tolist() == passkey.tokens[passkey.answer_start:].tolist()
    assert sample("mq_niah", seed=4).answer_sources == []  # two values from two needles: not one copy
    text = TOK.decode(sample("mq_niah", seed=4).tokens.tolist())
    pairs = dict(re.findall(r"\| One of the special magic numbers for ([A-Z]{5}) is (\d{6})\.\|", text))
    assert len(pairs) == 6
    keys = re.search(r"numbers for ([A-Z]{5}) and ([A-Z]{5}) mentioned", text).groups()
    assert text.endswith("Answer: " + " ".join(pairs[k] for k in keys))
    text = TOK.decode(sample("mv_niah", seed=5).tokens.tolist())
    found = re.findall(r"\| One of the special magic numbers for ([A-Z]{5}) is (\d{6})\.\|", text)
    assert len({k for k, _ in found}) == 1 and text.endswith("Answer: " + " ".join(v for _, v in found))
    text = TOK.decode(sample("vt", seed=6).tokens.tolist())
    value = re.search(r"assigned the value (\d{8})\. Answer:", text).group(1)
    assign = dict((b, a) for b, a in re.findall(r"\|VAR ([A-Z]{5}) = ([A-Z0-9]+)\|", text))
    assert len(assign) == 6
    chain = [n for n in assign if assign[n] == value]
    while len(chain) < 3:
        chain += [n for n in assign if assign[n] == chain[-1]]
    assert text.endswith("Answer: " + ", ".join(chain))
    text = TOK.decode(sample("passkey", seed=7).tokens.tolist())
    key = re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key", text).group(1)
    assert text.endswith(f"The pass key is {key}")


def test_depth_places_the_needle_and_rejects_multi_needle_tasks():
    starts = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = sample("s_niah", length=4000, seed=1, depth=depth)
        context_len = s.answer_start - len(TOK.encode(" What is the special magic number for long-context mentioned "
                                                      "in the provided text? Answer: "))
        starts.append(s.needle_starts[0] / context_len)
    assert starts[0] == 0.0 and starts[-1] > 0.97
    assert all(abs(got - want) < 0.04 for got, want in zip(starts, (0.0, 0.25, 0.5, 0.75, 1.0)))  # within a sentence
    with pytest.raises(ValueError, match=r"task 'mq_niah': depth=0.5 needs a single-needle task"):
        sample("mq_niah", depth=0.5)


def test_ruler_string_match_rules():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("The numbers are 123 and 457.", ["123", "456"]) == 0.5
    assert string_match_all("  ABC-def\x01 ", ["abc-DEF"]) == 1.0  # case-insensitive, stripped
    assert string_match_all("12345", ["234"]) == 1.0  # substring containment, as RULER scores
    assert string_match_all("a\x00b", ["a\nb"]) == 1.0  # control characters become newlines
    assert string_match_part("only 456", ["123", "456"]) == 1.0 and string_match_part("none", ["1"]) == 0.0
    import torch

    logits = torch.full((3, 10), -1.0)
    logits[[0, 1, 2], [4, 5, 6]] = 1.0
    assert answer_token_correct(logits, torch.tensor([4, 5, 6])).tolist() == [True, True, True]
    assert answer_token_correct(logits, torch.tensor([4, 5, 7])).tolist() == [True, True, False]  # not an exact match


def test_interval_maths():
    lo, hi = wilson_interval(0, 4)
    assert lo == 0.0 and abs(hi - 0.4899) < 1e-4  # z^2 / (n + z^2)
    lo, hi = wilson_interval(9, 10)
    assert abs(lo - 0.5958) < 1e-4 and abs(hi - 0.9821) < 1e-4
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = mean_interval(5.0, 5.0, 10)  # five 1s and five 0s: mean 0.5, sd 0.527
    assert abs(lo - (0.5 - 1.96 * 0.5270 / 10**0.5)) < 1e-3 and abs(hi - (0.5 + 1.96 * 0.5270 / 10**0.5)) < 1e-3
    assert mean_interval(10.0, 10.0, 10) == (1.0, 1.0)


def test_eval_data_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"data tasks=\['s_niah', 'nope'\]: unknown \['nope'\]; choose from s_niah"):
        LengthEvalData(tasks=["s_niah", "nope"])
    with pytest.raises(ConfigError, match=r"data depth_tasks=\['vt'\]: \['vt'\] not in tasks=\['s_niah'\]"):
        LengthEvalData(tasks=["s_niah"], depth_tasks=["vt"])
    with pytest.raises(ConfigError, match=r"data ppl_lengths=\[1024\] needs a ppl_corpus"):
        LengthEvalData(ppl_lengths=[1024])
    with pytest.raises(ConfigError, match=r"data depths=\[0, 120\]: depths are percentages within \[0, 100\]"):
        LengthEvalData(depths=[0, 120])
    with pytest.raises(ConfigError, match=r"^data depth_samples=0 must be >= 1$"):
        LengthEvalData(depth_samples=0)
    data = LengthEvalData(tasks=["niah_single_2"], depth_tasks=[], lengths=[256])
    with pytest.raises(ConfigError, match=r"data lengths: task 'niah_single_2' takes \d+ tokens before any haystack"):
        data.setup("test")


def test_samples_are_a_pure_function_of_the_seed():
    a = LengthEvalData(tasks=["s_niah", "vt"], lengths=[600, 900], depths=[0, 50], samples=2)
    b = LengthEvalData(tasks=["s_niah", "vt"], lengths=[600, 900], depths=[0, 50], samples=2)
    a.setup("test"), b.setup("test")
    assert [str(c) for c in a.cells] == [str(c) for c in b.cells] and len(a.cells) == 2 * 2 + 2
    for cell in a.cells:
        for i in range(2):
            x, y = a.sample(cell, i), b.sample(cell, i)
            assert np.array_equal(x["input_ids"].numpy(), y["input_ids"].numpy()) and x["answers"] == y["answers"]
    assert not np.array_equal(a.sample(a.cells[0], 0)["input_ids"], a.sample(a.cells[0], 1)["input_ids"])


def test_depth_grid_takes_its_own_sample_count_and_keeps_the_first_samples():
    data = LengthEvalData(tasks=["s_niah", "vt"], lengths=[600], depths=[0, 50], samples=5, depth_samples=2)
    fewer = LengthEvalData(tasks=["s_niah", "vt"], lengths=[600], depths=[0, 50], samples=2)
    data.setup("test"), fewer.setup("test")
    assert {c.label: data.samples_in(c) for c in data.cells} == {
        "s_niah L=600 depth=0%": 2, "s_niah L=600 depth=50%": 2, "vt L=600": 5}
    assert sum(1 for _ in data.test_dataloader()) == 2 + 2 + 5
    vt = data.cells[-1]
    for i in range(2):  # sample i of a cell does not depend on how many the cell has
        assert np.array_equal(data.sample(vt, i)["input_ids"], fewer.sample(vt, i)["input_ids"])


def test_perplexity_windows_of_every_length_end_on_the_same_tokens_whatever_the_length_list():
    data = LengthEvalData(tasks=["s_niah"], lengths=[600], ppl_corpus=str(ROOT / "README.md"),
                          ppl_lengths=[256, 1024, 512], ppl_samples=2)
    shorter = LengthEvalData(tasks=["s_niah"], lengths=[600], ppl_corpus=str(ROOT / "README.md"),
                             ppl_lengths=[256], ppl_samples=2)  # another run's list: the same text
    data.setup("test"), shorter.setup("test")
    stream = data.ppl_stream
    stride = len(stream) // 2
    for i in range(2):
        windows = {n: data.sample(Cell("perplexity", n), i)["input_ids"].numpy() for n in (256, 512, 1024)}
        assert {n: len(w) for n, w in windows.items()} == {256: 256, 512: 512, 1024: 1024}
        end = len(stream) - i * stride
        assert np.array_equal(windows[1024], stream[end - 1024:end])
        assert np.array_equal(windows[512][-256:], windows[256]) and np.array_equal(windows[1024][-512:], windows[512])
        assert np.array_equal(shorter.sample(Cell("perplexity", 256), i)["input_ids"].numpy(), windows[256])


def test_report_plots_are_labelled_with_the_run_not_the_temporary_folder(tmp_path, monkeypatch):
    from hsa_lightning.eval import report

    labels = []
    monkeypatch.setattr(report, "curves", lambda runs, path, perplexity: labels.extend(runs))
    rows = [{"task": "vt", "length": 512, "depth": -1, "n": 2, "tf_correct": 1, "tf_acc": 0.5, "tf_ci": [0.1, 0.9]},
            {"task": "perplexity", "length": 512, "depth": -1, "n": 1, "nll": 2.0, "last_nll": 2.0, "ppl": 7.39,
             "last_ppl": 7.39}]
    partial = tmp_path / ".main.partial-123"
    partial.mkdir()
    report.write_report(partial, rows, {}, label="main")
    assert labels == ["main", "main"]


def test_merge_joins_one_checkpoints_evaluation_split_over_several_commands(tmp_path, capsys):
    import json

    from hsa_lightning.eval.report import main, write_report

    def part(name, lengths, ppl_nll):
        rows = [{"task": "s_niah", "length": n, "depth": d, "n": 1, "tf_correct": int(d == 0), "tf_acc": float(d == 0),
                 "tf_ci": [0.0, 1.0], "answer_nll": 1.0} for n in lengths for d in (0, 100)]
        rows.append({"task": "perplexity", "length": 512, "depth": -1, "n": 1, "nll": ppl_nll, "last_nll": ppl_nll,
                     "ppl": 7.0, "last_ppl": 7.0})
        (tmp_path / name).mkdir()
        write_report(tmp_path / name, rows, {"lengths": lengths}, label=name)
        samples = [{"task": r["task"], "length": r["length"], "depth": r["depth"], "index": 0} for r in rows]
        (tmp_path / name / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))

    part("short", [512, 1024], ppl_nll=2.0)
    part("long", [4096], ppl_nll=2.5)  # its perplexity cell repeats the first part's
    out = tmp_path / "all"
    assert main([str(tmp_path / "short"), str(tmp_path / "long"), "-o", str(out), "--merge"]) == 0
    assert capsys.readouterr().out.startswith("perplexity at length 512 is in more than one part: taken from the first")
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert [(c["task"], c["length"], c["depth"]) for c in cells] == [
        ("s_niah", 512, 0), ("s_niah", 512, 100), ("s_niah", 1024, 0), ("s_niah", 1024, 100), ("s_niah", 4096, 0),
        ("s_niah", 4096, 100), ("perplexity", 512, -1)]
    assert cells[-1]["nll"] == 2.0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["task"], r["length"], r["depth"]) for r in samples] == [(c["task"], c["length"], c["depth"]) for c in cells]
    assert "| s_niah | 50.0 [" in (out / "results.md").read_text() and "4,096 |" in (out / "results.md").read_text()
    assert {"heatmap_s_niah.png", "accuracy.png", "perplexity.png"} <= {f.name for f in out.iterdir()}
    # an existing folder is never replaced
    assert main([str(tmp_path / "short"), "-o", str(out), "--merge"]) == 2
    assert capsys.readouterr().err == f"error: output {str(out)!r} already exists; merge into a new folder\n"


def test_accuracy_plot_adds_answer_nll_panels_only_when_the_results_have_them(tmp_path):
    from hsa_lightning.eval.report import curves

    cell = {"depth": -1, "n": 4, "tf_correct": 0, "tf_acc": 0.0, "tf_ci": [0.0, 0.5]}
    rows = [{**cell, "task": t, "length": n, "answer_nll": 3.0} for t in ("s_niah", "vt") for n in (512, 1024)]
    old = [{k: v for k, v in r.items() if k != "answer_nll"} for r in rows]
    assert curves({"new": rows, "old": old}, tmp_path / "a.png", perplexity=False) == [
        "s_niah (teacher-forced %)", "vt (teacher-forced %)",
        "s_niah (answer NLL per token)", "vt (answer NLL per token)"]
    assert curves({"old": old}, tmp_path / "b.png", perplexity=False) == ["s_niah (teacher-forced %)", "vt (teacher-forced %)"]
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_answer_nll_table_weights_depths_by_samples_and_skips_results_written_before_it():
    from hsa_lightning.eval.report import markdown

    cell = {"task": "s_niah", "length": 512, "tf_correct": 0, "tf_acc": 0.0, "tf_ci": [0.0, 0.5]}
    rows = [{**cell, "depth": 0, "n": 1, "answer_nll": 9.0}, {**cell, "depth": 100, "n": 3, "answer_nll": 1.0}]
    assert "| s_niah | 3.00 |" in markdown(rows, False)  # (9 * 1 + 1 * 3) / 4
    assert "First answer token" not in markdown(rows, False)  # results written before that column
    rows = [{**rows[0], "first_acc": 1.0}, {**rows[1], "first_acc": 1 / 3}]
    assert "| s_niah | 50.0 |" in markdown(rows, False).split("First answer token right")[1]  # (1 + 1) / 4
    old = [{k: v for k, v in r.items() if k != "answer_nll"} for r in rows]
    assert "Mean NLL" not in markdown(old, False) and "| s_niah | 0.0 [" in markdown(old, False)
    assert "Later answer tokens" not in markdown(rows, False)  # no copy split (no chunk memory, older files)
    copies = [{**rows[0], "inside": 5, "inside_n": 6, "edge": 0, "edge_n": 0},
              {**rows[1], "inside": 10, "inside_n": 15, "edge": 1, "edge_n": 3}]
    table = markdown(copies, False).split("Later answer tokens right")[1]
    assert "| s_niah | 71.4 / 33.3 (21 / 3) |" in table  # summed over depths by tokens: 15 / 21 and 1 / 3
    assert "Retrieval of the chunk" not in markdown(copies, False)  # written before the evaluation recorded it
    found = [{**copies[0], "found_first": 1, "found": 6, "found_right": 5, "missed_right": 0},
             {**copies[1], "found_first": 2, "found": 9, "found_right": 8, "missed_right": 3}]
    table = markdown(found, False).split("Retrieval of the chunk")[1]
    # first tokens 3 of 4 samples; later tokens (inside and at the edge) 15 of 24 retrieved, 13 of those
    # right, 3 of the 9 missed right
    assert "| s_niah | 75.0 / 62.5; 86.7 / 33.3 |" in table
    assert "Fusion weight of the source chunk" not in markdown(found, False)  # written before it was recorded
    weighed = [{**found[0], "weight_right": 2.5, "weight_wrong": 0.1},
               {**found[1], "weight_right": 5.5, "weight_wrong": 0.7}]
    table = markdown(weighed, False).split("Fusion weight of the source chunk")[1]
    # over the retrieved later tokens: right (2.5 + 5.5) / (5 + 8), wrong (0.1 + 0.7) / (1 + 1)
    assert "| s_niah | 0.615 / 0.400 |" in table


def test_source_chunk_watch_reads_each_query_rows_picks_in_the_whole_sequence_and_in_engine_segments():
    import torch

    from hsa_lightning.eval.source_chunks import SourceChunkWatch
    from hsa_lightning.model.attention_backend import Selection
    from hsa_lightning.model.config import ModelConfig
    from hsa_lightning.model.retrieval import Retrieval
    from hsa_lightning.registry import build_plugin, load_plugins

    load_plugins()
    layer = Retrieval(ModelConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, chunk_size=4, top_k=2),
                      build_plugin("attention", "HSAReference"))
    model = torch.nn.Sequential(layer)
    # rows r of a call starting at query_start pick chunks (r, r + 1) on head 0 and (r + 2, 0) on head 1,
    # the last slot of head 1 being padding (weight 0)
    def picks(x, landmarks, doc_start=None, query_start=0):
        rows = torch.arange(x.shape[1])[:, None]
        indices = torch.stack([torch.cat([rows, rows + 1], 1), torch.cat([rows + 2, rows * 0], 1)], 1)
        weights = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).expand(x.shape[1], 2, 2)
        return Selection(indices=indices[None], weights=weights[None])

    layer.forward = picks
    x, landmarks = torch.zeros(1, 5, 16), torch.zeros(1, 3, 16)
    # positions 1..3 in a call from 0: row 1 has {1, 2, 3}; row 2 has {2, 3, 4}; row 3 has {3, 4, 5}
    with SourceChunkWatch(model, [1, 2, 3, 3], [1, 4, 0, 6]) as watch:
        layer(x, landmarks)
    assert watch.hits.tolist() == [[True, True, False, False]]  # chunk 0 of row 3 is its padding slot
    assert watch.weights.tolist() == [[0.5, 1.0, 0.0, 0.0]]  # the largest weight over heads, 0 unpicked
    # two engine segments, positions 0-4 then 5-9 (query_start positional, then by keyword); the second
    # call's row 2 (position 7) picks {2, 3, 4}
    with SourceChunkWatch(model, [7, 7, 2], [4, 7, 3]) as watch:
        layer(x, landmarks, None, 0)
        layer(x, landmarks, query_start=5)
    assert watch.hits.tolist() == [[True, False, True]]
    assert watch.weights.tolist() == [[1.0, 0.0, 0.5]]
    assert not layer._forward_hooks  # closed: no hook left behind
    # opened under bf16-true precision (bf16 the default dtype, bf16 fusion weights): fp32 weights all the same
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with SourceChunkWatch(model, [1, 2], [1, 4]) as watch:
            layer(x, landmarks)
    finally:
        torch.set_default_dtype(default)
    assert watch.weights.dtype == torch.float32 and watch.weights.tolist() == [[0.5, 1.0]]
    # read_successor: one head reads a chunk twice (picked, and as the successor of the chunk before it)
    def picks_twice(x, landmarks, doc_start=None, query_start=0):
        indices = torch.tensor([[2, 1, 2, 3], [0, 2, 2, 1]]).expand(x.shape[1], 2, 4)
        weights = torch.tensor([[0.25, 0.125, 0.5, 0.125], [0.5, 0.125, 0.25, 0.125]]).expand(x.shape[1], 2, 4)
        return Selection(indices=indices[None], weights=weights[None])

    layer.forward = picks_twice
    with SourceChunkWatch(model, [1, 1], [2, 1]) as watch:
        layer(x, landmarks)
    assert watch.weights.tolist() == [[0.75, 0.125]]  # both slots of head 0 (0.25 + 0.5) beat head 1's 0.375


GRID = ["--data.init_args.lengths", "[512, 1024]", "--data.init_args.depths", "[0, 100]",
        "--data.init_args.samples", "2", "--data.init_args.ppl_lengths", "[512, 1024]",
        "--trainer.enable_progress_bar", "false"]


def _eval(tmp_path, out, *extra):
    args = ["test", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / "configs/eval/tiny.yaml"),
            *GRID, "--data.init_args.ppl_corpus", str(ROOT / "README.md"),
            "--trainer.callbacks.init_args.output_dir", str(tmp_path / out), *extra]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_evaluation_runs_in_bf16_true_precision_as_the_gpu_evaluations_do(tmp_path):
    # configs/experiments/eval.yaml tests in bf16-true, which makes bf16 the default dtype inside the test
    # step: the evaluator's own tensors must not follow it (session 13's GPU evaluations failed on that)
    _eval(tmp_path, "bf16", "--data.init_args.depths", "[0]", "--data.init_args.samples", "1",
          "--data.init_args.tasks", "[s_niah]", "--data.init_args.ppl_lengths", "[512]",
          "--trainer.precision", "bf16-true", "--trainer.callbacks.init_args.engine_threshold", "512")  # 1024: engine
    rows = [json.loads(line) for line in (tmp_path / "bf16/samples.jsonl").read_text().splitlines()]
    niah = [r for r in rows if r["task"] == "s_niah"]
    assert len(niah) == 2 and all(len(r["source_chunk_weight"]) == len(r["answer_token_correct"]) for r in niah)


@pytest.mark.slow
def test_suite_end_to_end_writes_every_output_reproducibly_and_the_engine_agrees(tmp_path, capsys):
    first = _eval(tmp_path, "a")
    assert "[eval] s_niah L=512 depth=0%: teacher-forced" in first.stdout
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["accuracy.png", "heatmap_s_niah.png", "perplexity.png", "results.json", "results.md",
                     "samples.jsonl"]
    assert (tmp_path / "a/heatmap_s_niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (tmp_path / "a/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 + 2 * 2 + 2 * 2 + 2 * 2  # s_niah x depths, passkey, niah_single_2, perplexity
    table = (tmp_path / "a/results.md").read_text()
    assert "| s_niah | " in table and "| 512 | 2 |" in table
    # each cell's answer NLL is its samples' (s_niah answers are all 7 tokens, so the per-token mean is theirs)
    cells = json.loads((tmp_path / "a/results.json").read_text())["cells"]
    for cell in (c for c in cells if c["task"] == "s_niah"):
        mine = [r["answer_nll"] for r in rows
                if (r["task"], r["length"], r["depth"]) == ("s_niah", cell["length"], cell["depth"])]
        assert abs(cell["answer_nll"] - sum(mine) / len(mine)) < 1e-3, (cell, mine)
        first = [r["answer_token_correct"][0] for r in rows
                 if (r["task"], r["length"], r["depth"]) == ("s_niah", cell["length"], cell["depth"])]
        assert cell["first_acc"] == sum(first) / len(first)  # the lookup, apart from the copy
        split = [(right, edge) for r in rows if (r["task"], r["length"], r["depth"]) == ("s_niah", cell["length"],
                 cell["depth"]) for right, edge in zip(r["answer_token_correct"][1:], r["copy_starts_chunk"])]
        assert (cell["inside_n"], cell["edge_n"]) == (sum(not e for _, e in split), sum(e for _, e in split))
        assert (cell["inside"], cell["edge"]) == (sum(c and not e for c, e in split), sum(c and e for c, e in split))
        mine = [r for r in rows if (r["task"], r["length"], r["depth"]) == ("s_niah", cell["length"], cell["depth"])]
        assert all(len(r["source_chunk_retrieved"]) == len(r["answer_token_correct"]) for r in mine)
        found = [(right, hit) for r in mine for right, hit in zip(r["answer_token_correct"][1:], r["source_chunk_retrieved"][1:])]
        assert cell["found_first"] == sum(r["source_chunk_retrieved"][0] for r in mine)
        assert (cell["found"], cell["found_right"], cell["missed_right"]) == (
            sum(h for _, h in found), sum(c and h for c, h in found), sum(c and not h for c, h in found))
        weighed = [(right, w, hit) for r in mine for right, w, hit in zip(
            r["answer_token_correct"][1:], r["source_chunk_weight"][1:], r["source_chunk_retrieved"][1:])]
        assert all((w > 0) == hit and 0 <= w <= 1 for _, w, hit in weighed)  # a weight exactly where picked
        assert abs(cell["weight_right"] - sum(w for c, w, _ in weighed if c)) < 1e-3
        assert abs(cell["weight_wrong"] - sum(w for c, w, _ in weighed if not c)) < 1e-3
    assert "Mean NLL per answer token" in table and "First answer token right" in table
    assert "Later answer tokens right" in table  # tiny.yaml's chunk memory (chunk 32): the copy split
    assert "Retrieval of the chunk each answer token is copied from" in table
    assert "Fusion weight of the source chunk" in table
    # benchmarks/answer_copies.py regenerates the same keys and counts the same later tokens
    from benchmarks.answer_copies import main as answer_copies

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus/text.jsonl").write_text(json.dumps({"text": "a few words of training text"}) + "\n")
    assert answer_copies([str(tmp_path / "a"), "--chunk_size", "32", "--corpus", str(tmp_path / "corpus")]) == 0
    counted = [re.findall(r"\((\d+)\)|\| -", line) for line in capsys.readouterr().out.splitlines()
               if line.startswith("| <") or line.startswith("| 1") or line.startswith("| >")]
    edges = [e for r in rows if r["task"] == "s_niah" for e in r["copy_starts_chunk"]]
    firsts = sum(r["task"] == "s_niah" for r in rows)
    assert [sum(int(c[i] or 0) for c in counted) for i in (0, 1, 2)] == [firsts, edges.count(False), edges.count(True)]
    for r in (r for r in rows if r["task"] != "perplexity"):  # the per-token detail adds up to the sample's
        assert len(r["answer_token_nll"]) == len(r["answer_token_correct"]) > 0
        assert abs(sum(r["answer_token_nll"]) / len(r["answer_token_nll"]) - r["answer_nll"]) < 2e-3
        assert r["teacher_forced"] == all(r["answer_token_correct"])
    # the same seed writes the same files
    _eval(tmp_path, "b")
    for name in ("samples.jsonl", "results.md", "results.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text().replace(
            str(tmp_path / "b"), str(tmp_path / "a"))
    # every sample through the chunked inference engine: the same verdicts, NLLs within float32 noise
    _eval(tmp_path, "engine", "--trainer.callbacks.init_args.engine_threshold", "1",
          "--trainer.callbacks.init_args.segment_len", "100")
    plain = [json.loads(line) for line in (tmp_path / "a/samples.jsonl").read_text().splitlines()]
    chunked = [json.loads(line) for line in (tmp_path / "engine/samples.jsonl").read_text().splitlines()]
    for p, c in zip(plain, chunked):
        assert p.get("teacher_forced") == c.get("teacher_forced") and p.get("generation") == c.get("generation")
        assert p.get("source_chunk_retrieved") == c.get("source_chunk_retrieved")  # the engine's segments too
        weights = p.get("source_chunk_weight", []), c.get("source_chunk_weight", [])
        assert len(weights[0]) == len(weights[1]) and all(abs(a - b) < 1e-3 for a, b in zip(*weights))
        for key in ("answer_nll", "nll", "last_nll"):
            if key in p:
                assert abs(p[key] - c[key]) < 2e-3, (key, p, c)
    # two ranks (gloo): cell totals summed by torchmetrics, samples gathered, the same report
    _eval(tmp_path, "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    for name in ("samples.jsonl", "results.md"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "ddp" / name).read_text()
    # a baseline (Dense layout, Flash backend) through the same suite, then one plot for both
    _eval(tmp_path, "dense", "--model.layout", "Dense", "--model.attention", "Flash")
    from hsa_lightning.eval.report import main as compare

    assert compare([str(tmp_path / "a"), str(tmp_path / "dense"), "-o", str(tmp_path / "cmp")]) == 0
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"compare_accuracy.png", "compare_perplexity.png",
                                                               "compare.md"}
    assert "## a\n" in (tmp_path / "cmp/compare.md").read_text() and "## dense\n" in (tmp_path / "cmp/compare.md").read_text()
    # an existing report is refused without overwrite
    res = run_cli(["test", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / "configs/eval/tiny.yaml"),
                   *GRID, "--data.init_args.ppl_corpus", str(ROOT / "README.md"),
                   "--trainer.callbacks.init_args.output_dir", str(tmp_path / "a"),
                   "--trainer.callbacks.init_args.overwrite", "false"], tmp_path)
    assert res.returncode == 2 and f"output '{tmp_path / 'a'}' already exists; pass --overwrite" in res.stderr


@pytest.mark.parametrize("strategy", ["FSDP2Strategy", "FSDPStrategy"])
def test_length_eval_refuses_sharded_strategies_before_building_anything(strategy):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from hsa_lightning.eval.evaluator import LengthEval
    from hsa_lightning.lit.fsdp2_strategy import FSDP2Strategy

    trainer = SimpleNamespace(strategy={"FSDP2Strategy": FSDP2Strategy, "FSDPStrategy": FSDPStrategy}[strategy]())
    with pytest.raises(ConfigError) as info:
        LengthEval().setup(trainer, None, "test")
    assert str(info.value) == (
        f"the LengthEval suite runs the whole model on each device (one device or DDP), not under {strategy}; "
        "stack configs/strategies/single.yaml or ddp.yaml, and make a sharded checkpoint one file first "
        "(python -m hsa_lightning.lit.consolidate FOLDER)")


def test_source_weights_splits_answer_tokens_by_place_and_outcome(tmp_path, capsys):
    from benchmarks.source_weights import main as source_weights

    rows = [{"task": "s_niah", "answer_token_correct": [True, True, False, False],
             "copy_starts_chunk": [False, True, False], "source_chunk_weight": [0.95, 0.2, 0.3, 0.92]},
            {"task": "s_niah", "answer_token_correct": [False, True, True, False],
             "copy_starts_chunk": [False, False, True], "source_chunk_weight": [0.6, 1.0, 0.7, 0.1]},
            {"task": "vt", "answer_token_correct": [False], "source_chunk_weight": [0.0]},  # another task
            {"task": "s_niah", "answer_token_correct": [False, False]}]  # evaluated before the weights were recorded
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert source_weights([str(tmp_path)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[1:] == ["| first | right | 1 | 0.950 | 0% | 100% |",
                         "| first | wrong | 1 | 0.600 | 0% | 0% |",
                         "| inside a chunk | right | 3 | 0.633 | 33% | 33% |",  # 0.2, 1.0, 0.7
                         "| inside a chunk | wrong | 1 | 0.920 | 0% | 100% |",
                         "| starts a chunk | wrong | 2 | 0.200 | 100% | 0% |"]  # none right: no row
    (tmp_path / "samples.jsonl").write_text(json.dumps(rows[3]) + "\n")
    with pytest.raises(SystemExit, match="no s_niah row of .* records source_chunk_weight"):
        source_weights([str(tmp_path)])
