"""LengthEval: the callback that scores ``LengthEvalData`` samples during ``cli.py test`` and writes the report.

Per retrieval sample: teacher-forced exact match of every answer token (the paper's protocol), the
mean NLL of the answer tokens (a graded signal where exact match is still 0) and,
with ``generate``, RULER's ``string_match_all`` on a greedy continuation of ``max_new_tokens``. Per
perplexity window: mean token NLL and the NLL of its last ``last_tokens`` tokens. Samples up to
``engine_threshold`` tokens run one plain forward; longer ones go through the inference engine
(segmented prefill, suffix-only upper decoder), which gives the same numbers where both fit. Cell
totals are torchmetrics ``SumMetric``s, summed across ranks; per-sample records are gathered to rank 0.

Outputs (``output_dir``, written complete or not at all): ``samples.jsonl``, ``results.json``,
``results.md`` (task x length), ``heatmap_<task>.png`` (depth x length, like the paper's Figure 4),
``accuracy.png`` and ``perplexity.png`` (against length). A rerun with the same seed writes the same
files (timings go to the console only).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.aggregation import SumMetric

from hsa_lightning.data.atomic import atomic_folder, refuse_overwrite
from hsa_lightning.errors import ConfigError
from hsa_lightning.eval.datamodule import Cell, LengthEvalData
from hsa_lightning.eval.report import summarise, write_report
from hsa_lightning.eval.scoring import answer_token_correct, string_match_all
from hsa_lightning.eval.source_chunks import SourceChunkWatch
from hsa_lightning.inference import InferenceEngine
from hsa_lightning.model.blocks import HSABlock

SUMS = ("n", "tf", "first", "inside", "inside_n", "edge", "edge_n", "found_first", "found", "found_right",
        "missed_right", "weight_right", "weight_wrong", "gen", "gen_sq", "nll", "tokens", "last_nll", "last_tokens")


class LengthEval(Callback):
    def __init__(self, output_dir: str = "eval", engine_threshold: int = 32768, segment_len: int = 16384,
                 generate: bool = True, max_new_tokens: int = 32, last_tokens: int = 4096, overwrite: bool = False):
        """
        Args:
            output_dir: where the report goes (refused if it exists, unless ``overwrite``).
            engine_threshold: samples longer than this use the chunked inference engine.
            segment_len: the engine's prefill segment.
            generate: also score greedy generations with RULER's string_match_all.
            max_new_tokens: tokens generated per sample.
            last_tokens: the perplexity windows' "last-N-token" loss (the paper's last 4K).
        """
        for name, value in (("engine_threshold", engine_threshold), ("segment_len", segment_len),
                            ("max_new_tokens", max_new_tokens), ("last_tokens", last_tokens)):
            if value < 1:
                raise ConfigError(f"LengthEval {name}={value} must be >= 1")
        self.output_dir, self.overwrite = Path(output_dir), overwrite
        self.engine_threshold, self.segment_len = engine_threshold, segment_len
        self.generate, self.max_new_tokens, self.last_tokens = generate, max_new_tokens, last_tokens

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):  # before any model is built
            raise ConfigError(
                f"the LengthEval suite runs the whole model on each device (one device or DDP), not under "
                f"{type(trainer.strategy).__name__}; stack configs/strategies/single.yaml or ddp.yaml, and make a "
                f"sharded checkpoint one file first (python -m hsa_lightning.lit.consolidate FOLDER)")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        if not isinstance(data, LengthEvalData):
            raise ConfigError("the LengthEval callback scores LengthEvalData samples; set data: LengthEvalData")
        if trainer.is_global_zero:
            refuse_overwrite(self.output_dir, self.overwrite)
        self.data = data
        # the chunk size of a retrieved chunk memory, for the copy-inside / copy-across-chunks split
        retrieves = any(isinstance(b, HSABlock) and b.backend.needs_retrieval for b in pl_module.model.modules())
        self.chunk_size = pl_module.model.config.chunk_size if retrieves else None
        self.sums = {cell: {k: SumMetric().to(pl_module.device) for k in SUMS} for cell in data.cells}
        self.records: list[dict] = []
        self._cell, self._cell_time = None, time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch["eval_kind"] == "skip":  # padding that keeps the ranks' step counts equal
            return
        cell = Cell(batch["task"], batch["length"], batch["depth"])
        if cell != self._cell:
            self._announce(trainer)
            self._cell, self._cell_time = cell, time.perf_counter()
        model = pl_module.model
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            record = self._score_task(model, batch) if batch["eval_kind"] == "task" else self._score_ppl(model, batch)
        sums = {**dict.fromkeys(SUMS, 0.0), **record.pop("_sums"), "n": 1.0}
        for key, value in sums.items():  # every metric of the cell, so none is computed without an update
            self.sums[cell][key].update(torch.tensor(float(value), device=pl_module.device))
        self.records.append(record)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._announce(trainer)
        totals = {cell: {k: float(m.compute()) for k, m in sums.items()} for cell, sums in self.sums.items()}
        records = self.records
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        records.sort(key=lambda r: (r["task"], r["length"], r["depth"], r["index"]))
        rows = summarise(totals, self.data.cells, self.generate)
        with atomic_folder(self.output_dir) as folder:
            folder.mkdir(parents=True)
            with open(folder / "samples.jsonl", "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            write_report(folder, rows, self.data.hparams, label=Path(self.output_dir).name)
        rank_zero_info(f"[eval] wrote {len(records)} samples and the report to {self.output_dir}/")

    # -- scoring -----------------------------------------------------------------------------------
    def _engine(self, model, max_tokens: int) -> InferenceEngine:
        return InferenceEngine(model, max_tokens=max_tokens, segment_len=self.segment_len, progress=False)

    def _answer_logits(self, model, ids: torch.Tensor, a: int, e: int) -> torch.Tensor:
        """Logits (n, V) at the positions predicting tokens a..e-1."""
        if ids.shape[1] <= self.engine_threshold:
            return model.head(model.hidden_states(ids[:, :e - 1])[0, a - 1:])
        return self._engine(model, ids.shape[1]).prefill(ids[:, :e], last=e - a + 1)[0, :-1]

    def _score_task(self, model, batch: dict) -> dict:
        ids, a, e = batch["input_ids"], batch["answer_start"], batch["answer_end"]
        answer = ids[0, a:e]
        sources = batch["answer_sources"] if self.chunk_size else []
        # the query predicting answer token i sits at a - 1 + i; it should read the chunk of the token's source
        with SourceChunkWatch(model, [a - 1 + i for i in range(len(sources))],
                              [s // self.chunk_size for s in sources]) as watch:
            logits = self._answer_logits(model, ids, a, e)
        correct = answer_token_correct(logits, answer)
        tf = bool(correct.all())  # the paper's teacher-forced exact match
        record = {k: batch[k] for k in ("task", "length", "depth", "index", "answers")}
        token_nll = F.cross_entropy(logits.float(), answer, reduction="none")
        nll = token_nll.sum()
        # per answer token: tells finding the needle (the first tokens) from copying it (the rest)
        record.update(teacher_forced=tf, answer_nll=round(float(nll) / answer.numel(), 4),
                      answer_token_nll=[round(float(x), 3) for x in token_nll],
                      answer_token_correct=correct.tolist(),
                      needle_starts=batch["needle_starts"])
        sums = {"tf": float(tf), "first": float(correct[0]), "nll": float(nll), "tokens": answer.numel()}
        if sources:
            # a later answer token copies the successor of the previous one: inside the same chunk of the
            # memory, or the first token of the next chunk (its source starts a chunk)
            edge = [s % self.chunk_size == 0 for s in sources[1:]]
            found, weight = watch.hits[0].tolist(), watch.weights[0].tolist()
            record.update(copy_starts_chunk=edge, source_chunk_retrieved=found,
                          source_chunk_weight=[round(w, 4) for w in weight])
            later = correct[1:].tolist()
            sums.update(inside=sum(c for c, e in zip(later, edge) if not e), inside_n=edge.count(False),
                        edge=sum(c for c, e in zip(later, edge) if e), edge_n=edge.count(True),
                        found_first=float(found[0]), found=sum(found[1:]),
                        found_right=sum(c and f for c, f in zip(later, found[1:])),
                        missed_right=sum(c and not f for c, f in zip(later, found[1:])),
                        weight_right=sum(w for c, w in zip(later, weight[1:]) if c),
                        weight_wrong=sum(w for c, w in zip(later, weight[1:]) if not c))
        if self.generate:
            engine = self._engine(model, a + self.max_new_tokens)
            text = self.data.tokenizer.decode(engine.generate(ids[:, :a], self.max_new_tokens)[0])
            score = string_match_all(text, batch["answers"])
            record.update(generation=text, string_match=score)
            sums.update(gen=score, gen_sq=score * score)
        record["_sums"] = sums
        return record

    def _score_ppl(self, model, batch: dict) -> dict:
        ids = batch["input_ids"]
        if ids.shape[1] <= self.engine_threshold:
            # the last token predicts nothing; without it the shape is the retrieval cells' (L - 1), so the
            # sliding-window attention compiled for them is reused instead of compiled again
            h = model.hidden_states(ids[:, :-1])[0]
            nll = torch.cat([F.cross_entropy(model.head(h[s:s + 4096]).float(), ids[0, s + 1:s + 4097],
                                             reduction="none") for s in range(0, h.shape[0], 4096)])
        else:
            nll = self._engine(model, ids.shape[1]).token_nll(ids)[0]
        last = nll[-self.last_tokens:]
        record = {k: batch[k] for k in ("task", "length", "depth", "index")}
        record.update(nll=round(float(nll.mean()), 4), last_nll=round(float(last.mean()), 4))
        record["_sums"] = {"nll": float(nll.sum()), "tokens": nll.numel(), "last_nll": float(last.sum()),
                           "last_tokens": last.numel()}
        return record

    def _announce(self, trainer) -> None:
        """One line per finished cell on this rank: progress a researcher can follow on long runs."""
        cell = self._cell
        if cell is None or not trainer.is_global_zero:
            return
        local = [r for r in self.records if (r["task"], r["length"], r["depth"]) == (cell.task, cell.length, cell.depth)]
        took = time.perf_counter() - self._cell_time
        if cell.task == "perplexity":
            detail = f"mean NLL {sum(r['nll'] for r in local) / len(local):.3f}"
        else:
            detail = f"teacher-forced {sum(r['teacher_forced'] for r in local)}/{len(local)}"
            if self.generate:
                detail += f", string match {100 * sum(r['string_match'] for r in local) / len(local):.1f}%"
        print(f"[eval] {cell.label}: {detail} ({took:.1f} s)", flush=True)
