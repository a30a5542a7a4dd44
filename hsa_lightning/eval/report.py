"""Tables and plots of the evaluation suite; ``python -m hsa_lightning.eval.report`` overlays several runs.

    python -m hsa_lightning.eval.report runs/eval/ultralong runs/eval/dense runs/eval/swa -o runs/eval/compare

draws every task's accuracy and answer NLL (``compare_accuracy.png``) and the perplexity
(``compare_perplexity.png``) of each run (its ``results.json``) against length on shared plots, labelled
by folder name, and writes ``compare.md``. With ``--merge`` the folders are parts of one checkpoint's
evaluation (say 1K-64K, then 256K, then 1M, each its own ``test`` command) and become one report:

    python -m hsa_lightning.eval.report --merge runs/eval/main runs/eval/main_256k runs/eval/main_1m -o runs/eval/main_all
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from hsa_lightning.data.atomic import atomic_folder
from hsa_lightning.eval.scoring import mean_interval, wilson_interval


def summarise(totals: dict, cells: list, generation: bool) -> list[dict]:
    """One row per cell from its summed metrics."""
    rows = []
    for cell in cells:
        t = totals[cell]
        n = int(t["n"])
        row = {"task": cell.task, "length": cell.length, "depth": cell.depth, "n": n}
        if cell.task == "perplexity":
            row.update(nll=t["nll"] / max(t["tokens"], 1), last_nll=t["last_nll"] / max(t["last_tokens"], 1))
            row.update(ppl=math.exp(row["nll"]), last_ppl=math.exp(row["last_nll"]))
        else:
            row.update(tf_correct=int(t["tf"]), tf_acc=t["tf"] / max(n, 1), tf_ci=list(wilson_interval(t["tf"], n)),
                       answer_nll=t["nll"] / max(t["tokens"], 1), first_acc=t["first"] / max(n, 1))
            if t["inside_n"] + t["edge_n"]:  # answers copied from a needle, through a chunk memory
                row.update({k: int(t[k]) for k in ("inside", "inside_n", "edge", "edge_n", "found_first", "found",
                                                     "found_right", "missed_right")})
                row.update({k: round(float(t[k]), 4) for k in ("weight_right", "weight_wrong")})
            if generation:
                row.update(string_match=t["gen"] / max(n, 1), string_match_ci=list(mean_interval(t["gen"], t["gen_sq"], n)))
        rows.append(row)
    return rows


def by_task_length(rows: list[dict]) -> dict:
    """Retrieval rows merged over depths: {(task, length): (correct, n, string-match sum)}."""
    out: dict = {}
    for r in rows:
        if r["task"] == "perplexity":
            continue
        c, n, g = out.get((r["task"], r["length"]), (0, 0, 0.0))
        out[(r["task"], r["length"])] = (c + r["tf_correct"], n + r["n"], g + r.get("string_match", 0.0) * r["n"])
    return out


def over_depths(rows: list[dict], column: str) -> dict:
    """{(task, length): mean of a per-sample column} over depths, weighted by samples (results.json files
    written before the column existed have none): ``answer_nll``, ``first_acc``."""
    sums: dict = {}
    for r in rows:
        if r["task"] != "perplexity" and column in r:
            s, n = sums.get((r["task"], r["length"]), (0.0, 0))
            sums[(r["task"], r["length"])] = (s + r[column] * r["n"], n + r["n"])
    return {key: s / n for key, (s, n) in sums.items() if n}


def copy_split(rows: list[dict]) -> dict:
    """{(task, length): [inside right, inside n, edge right, edge n]} summed over depths: later answer tokens
    whose source lies inside the chunk of the token before, or starts the next chunk (rows that have them)."""
    sums: dict = {}
    for r in rows:
        if "inside_n" in r:
            s = sums.setdefault((r["task"], r["length"]), [0, 0, 0, 0])
            for i, key in enumerate(("inside", "inside_n", "edge", "edge_n")):
                s[i] += r[key]
    return sums


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def retrieval_split(rows: list[dict]) -> dict:
    """{(task, length): [needle chunk retrieved for the first token, samples, later tokens whose source chunk
    was retrieved, later tokens, right of those retrieved, right of those missed]} summed over depths (rows
    written since the evaluation records it)."""
    sums: dict = {}
    for r in rows:
        if "found" in r:
            s = sums.setdefault((r["task"], r["length"]), [0, 0, 0, 0, 0, 0])
            for i, value in enumerate((r["found_first"], r["n"], r["found"], r["inside_n"] + r["edge_n"],
                                       r["found_right"], r["missed_right"])):
                s[i] += value
    return sums


def source_weights(rows: list[dict]) -> dict:
    """{(task, length): [fusion weight of the source chunk summed over the later answer tokens that came out
    right with it retrieved, how many, summed over the wrong ones with it retrieved, how many]} summed over
    depths (rows written since the evaluation records it; an unretrieved chunk weighs 0 in both sums)."""
    sums: dict = {}
    for r in rows:
        if "weight_right" in r:
            s = sums.setdefault((r["task"], r["length"]), [0.0, 0, 0.0, 0])
            for i, value in enumerate((r["weight_right"], r["found_right"], r["weight_wrong"],
                                       r["found"] - r["found_right"])):
                s[i] += value
    return sums


def markdown(rows: list[dict], with_generation: bool) -> str:
    merged = by_task_length(rows)
    lengths = sorted({length for _, length in merged})
    tasks = list(dict.fromkeys(t for t, _ in merged))
    lines = ["Teacher-forced exact match of every answer token, % [95% Wilson interval] (n)"
             + ("; below it RULER string_match_all on greedy generations, %." if with_generation else "."), "",
             "| task | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for t in tasks:
        cells = []
        for n in lengths:
            c, k, _ = merged.get((t, n), (0, 0, 0.0))
            lo, hi = wilson_interval(c, k)
            cells.append(f"{100 * c / k:.1f} [{100 * lo:.0f}, {100 * hi:.0f}] ({k})" if k else "")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
        if with_generation:
            gen = [f"{100 * merged[(t, n)][2] / merged[(t, n)][1]:.1f}" if (t, n) in merged else "" for n in lengths]
            lines.append(f"| {t} (generation) | " + " | ".join(gen) + " |")
    for column, title, scale, digits in (
            ("answer_nll", "Mean NLL per answer token, teacher-forced (guessing uniformly over the vocabulary scores ln V)",
             1, 2),
            ("first_acc", "First answer token right, % (finding the needle; the later tokens copy what follows it)",
             100, 1)):
        means = over_depths(rows, column)
        if means:
            lines += ["", title, "", "| task | " + " | ".join(f"{n:,}" for n in lengths) + " |",
                      "|---|" + "---|" * len(lengths)]
            lines += [f"| {t} | " + " | ".join(f"{scale * means[(t, n)]:.{digits}f}" if (t, n) in means else ""
                                               for n in lengths) + " |" for t in tasks]
    copies = copy_split(rows)
    if copies:
        lines += ["", "Later answer tokens right, %: copied from inside the previous token's memory chunk / from "
                  "the start of the next chunk (how many)", "",
                  "| task | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        lines += [f"| {t} | " + " | ".join(f"{_percent(c[0], c[1])} / {_percent(c[2], c[3])} ({c[1]} / {c[3]})"
                                           if (c := copies.get((t, n))) else "" for n in lengths) + " |"
                  for t in dict.fromkeys(t for t, _ in copies)]
    found = retrieval_split(rows)
    if found:
        def cell(f):
            first, n, hit, later, hit_right, miss_right = f
            return (f"{_percent(first, n)} / {_percent(hit, later)}; "
                    f"{_percent(hit_right, hit)} / {_percent(miss_right, later - hit)}")

        lines += ["", "Retrieval of the chunk each answer token is copied from, %: the needle's chunk for the first "
                  "token / the source chunk for later tokens; later tokens right when their chunk was retrieved / "
                  "when it was not (a miss there is retrieval's)", "",
                  "| task | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        lines += [f"| {t} | " + " | ".join(cell(f) if (f := found.get((t, n))) else "" for n in lengths) + " |"
                  for t in dict.fromkeys(t for t, _ in found)]
    weights = source_weights(rows)
    if weights:
        def mean_weights(w):
            return " / ".join(f"{total / n:.3f}" if n else "-" for total, n in (w[:2], w[2:]))

        lines += ["", "Fusion weight of the source chunk where it was retrieved (the largest any retrieval layer and "
                  "head gave it), mean over later answer tokens that came out right / wrong: a low weight on a "
                  "wrong token means the other picks outweighed it", "",
                  "| task | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        lines += [f"| {t} | " + " | ".join(mean_weights(w) if (w := weights.get((t, n))) else "" for n in lengths)
                  + " |" for t in dict.fromkeys(t for t, _ in weights)]
    ppl = [r for r in rows if r["task"] == "perplexity"]
    if ppl:
        lines += ["", "Held-out perplexity and last-window loss", "", "| length | n | perplexity | mean NLL | last-window NLL |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['length']:,} | {r['n']} | {r['ppl']:.2f} | {r['nll']:.4f} | {r['last_nll']:.4f} |" for r in ppl]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(rows: list[dict], task: str, path: Path) -> None:
    """Depth (rows, 0% at the top) x length (columns) teacher-forced accuracy, like the paper's Figure 4."""
    plt = _pyplot()
    cells = [r for r in rows if r["task"] == task and r["depth"] >= 0]
    depths = sorted({r["depth"] for r in cells})
    lengths = sorted({r["length"] for r in cells})
    grid = [[next((100 * r["tf_acc"] for r in cells if r["depth"] == d and r["length"] == n), float("nan"))
             for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{task}: teacher-forced accuracy (%)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves(runs: dict[str, list[dict]], path: Path, perplexity: bool) -> list[str]:
    """Against length, one line per run: every task's teacher-forced accuracy and, below it, the mean NLL
    per answer token (which still moves while every accuracy is 0), or (``perplexity``) the held-out
    perplexity and the last-window NLL. Returns the panels' titles."""
    plt = _pyplot()
    panels: list[tuple[str, dict[str, list]]] = []  # (title, {run: [(length, value)]})
    if perplexity:
        for title, key in (("perplexity", "ppl"), ("last-window NLL", "last_nll")):
            panels.append((title, {name: sorted((r["length"], r[key]) for r in rows if r["task"] == "perplexity")
                                   for name, rows in runs.items()}))
        columns = 2
    else:
        merged = {name: by_task_length(rows) for name, rows in runs.items()}
        nll = {name: over_depths(rows, "answer_nll") for name, rows in runs.items()}
        tasks = list(dict.fromkeys(t for cells in merged.values() for t, _ in cells))
        for task in tasks:
            panels.append((f"{task} (teacher-forced %)", {
                name: sorted((n, 100 * c / k) for (t, n), (c, k, _) in cells.items() if t == task and k)
                for name, cells in merged.items()}))
        if any(nll.values()):
            for task in tasks:
                panels.append((f"{task} (answer NLL per token)", {
                    name: sorted((n, v) for (t, n), v in cells.items() if t == task) for name, cells in nll.items()}))
        columns = len(tasks)
    rows_of_panels = len(panels) // columns
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4 * columns, 3.4 * rows_of_panels), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for name, pts in series.items():
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(title)
        if title.endswith("%)"):
            ax.set_ylim(-2, 102)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [title for title, _ in panels]


def write_report(folder: Path, rows: list[dict], settings, label: str) -> None:
    """results.json, results.md, accuracy.png, a heatmap per depth task and (with perplexity cells)
    perplexity.png into ``folder``; ``label`` names the run in the plots' legends (``folder`` may be a
    temporary folder that is renamed once complete)."""
    with_generation = any("string_match" in r for r in rows)
    (folder / "results.json").write_text(json.dumps({"settings": dict(settings), "cells": rows}, indent=1) + "\n")
    (folder / "results.md").write_text(markdown(rows, with_generation))
    for task in sorted({r["task"] for r in rows if r["depth"] >= 0}):
        heatmap(rows, task, folder / f"heatmap_{task}.png")
    if any(r["task"] != "perplexity" for r in rows):
        curves({label: rows}, folder / "accuracy.png", perplexity=False)
    if any(r["task"] == "perplexity" for r in rows):
        curves({label: rows}, folder / "perplexity.png", perplexity=True)


def merge(parts: list[Path], output: Path) -> list[tuple]:
    """One report (``write_report``'s files and ``samples.jsonl``) from several LengthEval folders of the same
    checkpoint. A cell scored in more than one part (the held-out perplexity that every command computes)
    is taken from the first part that has it; returns those cells' keys."""
    owner: dict[tuple, Path] = {}
    rows, settings, samples, repeated = [], [], [], []
    for part in parts:
        results = json.loads((part / "results.json").read_text())
        settings.append({"folder": str(part), **results["settings"]})
        for row in results["cells"]:
            key = (row["task"], row["length"], row["depth"])
            if key in owner:
                repeated.append(key)
                continue
            owner[key] = part
            rows.append(row)
        if (part / "samples.jsonl").is_file():
            for line in (part / "samples.jsonl").read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if owner.get((record["task"], record["length"], record["depth"])) == part:
                    samples.append(record)
    tasks = list(dict.fromkeys(r["task"] for r in rows))  # in the order the parts list them
    rows.sort(key=lambda r: (tasks.index(r["task"]), r["length"], r["depth"]))
    samples.sort(key=lambda r: (tasks.index(r["task"]), r["length"], r["depth"], r["index"]))
    with atomic_folder(output) as folder:
        folder.mkdir(parents=True)
        with open(folder / "samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in samples)
        write_report(folder, rows, {"merged": settings}, label=output.name)
    return repeated


def _short(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hsa_lightning.eval.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="output folders of LengthEval runs")
    p.add_argument("-o", "--output", required=True, help="folder for compare.png and compare.md")
    p.add_argument("--merge", action="store_true",
                   help="the folders are parts of one checkpoint's evaluation: write one report to OUTPUT")
    args = p.parse_args(argv)
    for run in args.runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            print(f"error: {path} not found (is {run!r} a LengthEval output folder?)", file=sys.stderr)
            return 2
    out = Path(args.output)
    if args.merge:
        if out.exists():
            print(f"error: output {str(out)!r} already exists; merge into a new folder", file=sys.stderr)
            return 2
        for task, length, depth in merge([Path(r) for r in args.runs], out):
            print(f"{task} at length {length}" + (f", depth {depth}%" if depth >= 0 else "")
                  + " is in more than one part: taken from the first")
        print(f"wrote the merged report of {len(args.runs)} parts to {out}/")
        return 0
    runs = {Path(run).name: json.loads((Path(run) / "results.json").read_text())["cells"] for run in args.runs}
    out.mkdir(parents=True, exist_ok=True)
    curves(runs, out / "compare_accuracy.png", perplexity=False)
    if any(r["task"] == "perplexity" for rows in runs.values() for r in rows):
        curves(runs, out / "compare_perplexity.png", perplexity=True)
    (out / "compare.md").write_text("\n".join(f"## {name}\n\n{markdown(rows, False)}" for name, rows in runs.items()))
    print(f"wrote compare_accuracy.png, compare_perplexity.png (with perplexity cells) and compare.md to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
