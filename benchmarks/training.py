"""Training throughput: tokens/s and MFU of one training step (forward, backward, AdamW) on one GPU, for
the small model with HSA (HSATriton, UltraLong layout) against the same dimensions as a dense model
(Flash backend, Dense layout: cuDNN / flash full causal attention in every block).

    python -m benchmarks.training --out docs/bench/training.json [--lengths 8192,16384,32768] [--compile 0,1]

bf16 autocast over fp32 weights (the run configs' bf16-mixed), random token ids (``--text``: the first tokens
of a prepared shard folder; an untrained model's chunk picks on random ids are as scattered as the kernel
benchmark's ``random`` pattern, on text they are smoother: docs/benchmarks.md), a constant number of
tokens per step (batch = tokens_per_step / L), the model prepared as ``configure_model`` does
(``lit/parallel.py``: per-unit torch.compile when asked, activation checkpointing when asked). MFU =
``HSALM.flops_per_token(L)`` x tokens/s / peak (989 TFLOP/s dense bf16 on H100/H200): model FLOPs count
what each architecture needs (HSA: window + top-k chunks + retrieval scores; dense: the causal triangle),
so the dense model's MFU counts its quadratic attention as useful work. Prints a markdown table, writes JSON.

Diagnosis: ``--profile N`` prints the kernel and CPU tables of N more steps and the GPU's busy time per
step (against the wall time, to see host stalls); ``--sync_debug 1`` lists the operations that make the
host wait for the GPU in one step; ``--trace_gaps DIR`` (with ``--profile``) keeps each row's Chrome trace in
DIR and blames the GPU's idle gaps on the host code that launched the next kernel (``benchmarks/host_gaps.py``).
With a cold cache the first compiled HSA step takes about 4 minutes (Triton autotuning, then inductor).
``--flex_tiles measured,default`` measures the HSA model with the sliding window's measured FlexAttention
backward tiles (``plugins/attention/hsa_triton.py::FLEX_BACKWARD_TILES``) and with FlexAttention's own choice.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from typing import Optional

import torch
import yaml

from hsa_lightning.lit.parallel import ParallelConfig, prepare
from hsa_lightning.lit.training_monitor import PEAK_BF16_TFLOPS
from hsa_lightning.model.hsalm import HSALM
from hsa_lightning.params import module_from_spec
from plugins.attention import hsa_triton

VARIANTS = {"HSA-UltraLong": {}, "Dense": {"attention": "Flash", "layout": "Dense"}}
FLEX_TILES = {"measured": hsa_triton.FLEX_BACKWARD_TILES, "default": {}}  # the dense model has no sliding window


def build(config: str, overrides: dict, parallel: ParallelConfig, device) -> HSALM:
    with open(config) as f:
        spec = yaml.safe_load(f)["model"]
    spec.update(overrides)
    m = module_from_spec(spec)
    model = m.build_model().to(device)
    return prepare(model, parallel)


def token_ids(batch: int, L: int, vocab_size: int, device, text: Optional[torch.Tensor]) -> torch.Tensor:
    """(batch, L + 1) ids: random, or the first tokens of ``text`` (a token stream)."""
    if text is None:
        gen = torch.Generator(device=device).manual_seed(0)
        return torch.randint(0, vocab_size, (batch, L + 1), device=device, generator=gen)
    need = batch * (L + 1)
    if len(text) < need:
        raise SystemExit(f"--text holds {len(text):,} tokens; batch {batch} x (L {L} + 1) needs {need:,}")
    ids = text[:need]
    if int(ids.max()) >= vocab_size:
        raise SystemExit(f"--text holds token id {int(ids.max())}, outside the model's vocab_size {vocab_size}: "
                         f"pass the --tokenizer it was written with and a config of that vocabulary")
    return ids.view(batch, L + 1).to(device)


def measure(model: HSALM, L: int, tokens_per_step: int, warmup: int, steps: int, profile: int = 0,
            sync_debug: bool = False, trace_gaps: str = "", text: Optional[torch.Tensor] = None) -> dict:
    device = next(model.parameters()).device
    batch = max(tokens_per_step // L, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = token_ids(batch, L, model.config.vocab_size, device, text)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll, n = model.loss(ids[:, :-1], ids[:, 1:])
        (nll / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    compile_start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    first = time.perf_counter() - compile_start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / steps
    if sync_debug:  # one more step, reporting every operation that makes the host wait for the GPU
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        torch.cuda.set_sync_debug_mode(0)
        syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]
        print(f"{len(syncs)} synchronizing operations in one step" + "".join(f"\n  {m}" for m in dict.fromkeys(syncs)))
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with torch_profile(activities=activities, with_stack=bool(trace_gaps)) as prof:
            for _ in range(profile):
                step()
            torch.cuda.synchronize()
        if trace_gaps:  # which host code the GPU waits for (benchmarks/host_gaps.py); the trace is kept
            import gzip
            import shutil
            import tempfile

            from benchmarks.host_gaps import report
            from hsa_lightning.data.atomic import atomic_file

            with tempfile.TemporaryDirectory() as tmp, atomic_file(trace_gaps) as partial:  # whole or not at all
                prof.export_chrome_trace(f"{tmp}/trace.json")
                with open(f"{tmp}/trace.json", "rb") as src, gzip.open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            report(trace_gaps, steps=profile)
        events = prof.key_averages()
        print(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
        print(events.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=90))
        from torch.autograd import DeviceType

        # device-side events only, as the table's own total: CPU-side ops carry their kernels' time too
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3 / profile
        print(f"GPU busy {busy:.1f} ms per step of {dt * 1e3:.1f} ms wall")
    tokens = batch * L
    return {"batch": batch, "step_ms": dt * 1e3, "tokens_per_s": tokens / dt, "warmup_s": first,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def trace_path(folder: str, variant: str, L: int) -> str:
    if not folder:
        return ""
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{variant}_{L}.trace.json.gz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small_gpu.yaml")
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--tokens_per_step", type=int, default=32768)
    ap.add_argument("--compile", default="0,1", help="per-unit torch.compile settings to measure")
    ap.add_argument("--activation_checkpointing", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--flex_tiles", default="measured",
                    help="the sliding window's FlexAttention backward tiles: measured, default or both (HSA rows)")
    ap.add_argument("--profile", type=int, default=0, help="also profile this many steps per row (kernel table)")
    ap.add_argument("--sync_debug", type=int, default=0, help="report the operations that wait for the GPU in one step")
    ap.add_argument("--trace_gaps", default="",
                    help="with --profile: a folder for the traces; blames the GPU's idle gaps on host code")
    ap.add_argument("--text", default="", help="a prepared shard folder whose first tokens replace the random ids")
    ap.add_argument("--tokenizer", default="data/demo/tokenizer.json", help="the tokenizer --text was written with")
    ap.add_argument("--out", default="docs/bench/training.json")
    args = ap.parse_args()
    tile_choices = args.flex_tiles.split(",")
    for flag, known in (("variants", VARIANTS), ("flex_tiles", FLEX_TILES)):
        for name in getattr(args, flag).split(","):
            if name not in known:
                raise SystemExit(f"--{flag}: unknown {name!r}; choose from {', '.join(known)}")
    text = None
    if args.text:
        from hsa_lightning.data.shards import stream_tokens
        from hsa_lightning.data.tokenizer import load_tokenizer

        text = torch.from_numpy(stream_tokens(args.text, load_tokenizer(args.tokenizer)))
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    meta = {"device": name, "torch": torch.__version__, "python": platform.python_version(), "date": str(date.today()),
            "config": args.config, "tokens_per_step": args.tokens_per_step, "peak_tflops": peak,
            "precision": "bf16 autocast, fp32 weights, fused AdamW, grad clipping",
            "tokens": f"the first tokens of {args.text}" if args.text else "random ids",
            "command": "python -m benchmarks.training " + " ".join(f"--{k} {v}" for k, v in vars(args).items())}
    rows = []
    for compiled in (bool(int(c)) for c in args.compile.split(",")):
        parallel = ParallelConfig(compile=compiled, activation_checkpointing=bool(args.activation_checkpointing))
        for variant, tiles in [(v, t) for v in args.variants.split(",") for t in tile_choices]:
            if variant == "Dense" and tiles != tile_choices[0]:
                continue
            hsa_triton.FLEX_BACKWARD_TILES = FLEX_TILES[tiles]  # read when a unit is traced, so after the reset
            torch._dynamo.reset()
            model = build(args.config, VARIANTS[variant], parallel, device)
            for L in (int(x) for x in args.lengths.split(",")):
                row = {"model": variant, "compile": compiled, "L": L, "parameters": model.num_parameters(),
                       "flex_tiles": tiles if variant != "Dense" else "",
                       **measure(model, L, args.tokens_per_step, args.warmup, args.steps, args.profile,
                                  bool(args.sync_debug), trace_path(args.trace_gaps, variant, L), text)}
                row["flops_per_token"] = model.flops_per_token(L)
                if peak:
                    row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / (peak * 1e12)
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:  # after every row, so a cut-off run keeps what it measured
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
                torch.cuda.empty_cache()
            del model
    print(json.dumps(meta))
    print("\n| model | FlexAttention tiles | compile | L | batch | step ms | tokens/s | MFU | peak GiB | HSA / Dense tokens/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    dense = {(r["compile"], r["L"]): r["tokens_per_s"] for r in rows if r["model"] == "Dense"}
    for r in rows:
        ratio = r["tokens_per_s"] / dense[(r["compile"], r["L"])] if r["model"] != "Dense" and (r["compile"], r["L"]) in dense else ""
        print(f"| {r['model']} | {r['flex_tiles']} | {r['compile']} | {r['L']} | {r['batch']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r.get('mfu', 0):.1%} | {r['peak_gib']:.1f} | {f'{ratio:.2f}x' if ratio else ''} |")


if __name__ == "__main__":
    main()
