"""Where the GPU waits for the host: GPU idle gaps of a profiler trace, blamed on what the host was doing.

    python -m benchmarks.host_gaps TRACE.json[.gz] [--min_gap_us 10] [--top 25]

Reads a Chrome trace exported by ``torch.profiler`` (``with_stack=True`` adds the Python frames). A gap
is the time between one GPU kernel's end and the next one's start. Each gap is blamed on the innermost
Python frame of this project (else the innermost operator) that issued the kernel which ends it, and on
the operators the launching thread spent the gap in. Prints both tables (microseconds summed over the
trace); ``benchmarks/training.py --trace_gaps`` runs it on a profiled training step.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict

PROJECT = ("hsa_lightning/", "kernels/", "plugins/", "benchmarks/")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def gaps(events: list[dict], min_gap_us: float = 10.0) -> tuple[dict, dict, float, float]:
    """(gap time by launching frame, gap time by host operator during the gap, total gap, busy) in us."""
    def spans(*cats):
        return [e for e in events if e.get("ph") == "X" and e.get("cat") in cats]

    kernels = sorted(spans("kernel", "gpu_memcpy", "gpu_memset"), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in spans("cuda_runtime", "cuda_driver")
                if "correlation" in e.get("args", {})}
    host = defaultdict(list)  # (pid, tid) -> host events sorted by start
    for e in sorted(spans("cpu_op", "python_function"), key=lambda e: e["ts"]):
        host[(e["pid"], e["tid"])].append(e)
    starts = {key: [e["ts"] for e in thread] for key, thread in host.items()}

    def enclosing(key, ts):
        """Host events of thread ``key`` that contain time ``ts``, outermost first."""
        spans = host.get(key, [])
        i = bisect.bisect_right(starts.get(key, []), ts)
        return [e for e in spans[max(0, i - 2000):i] if e["ts"] + e["dur"] >= ts]

    by_frame, by_op = defaultdict(float), defaultdict(float)
    total = busy = 0.0
    end = None
    for k in kernels:
        busy += k["dur"]
        if end is not None and k["ts"] - end >= min_gap_us:
            gap = k["ts"] - end
            total += gap
            launch = launches.get(k["args"].get("correlation"))
            if launch is None:
                by_frame["(launch not in trace)"] += gap
            else:
                key = (launch["pid"], launch["tid"])
                stack = enclosing(key, launch["ts"])
                ours = [e["name"] for e in stack
                        if e["cat"] == "python_function" and any(p in e["name"] for p in PROJECT)]
                ops = [e["name"] for e in stack if e["cat"] == "cpu_op"]
                by_frame[ours[-1] if ours else ops[-1] if ops else launch["name"]] += gap
                # what the launching thread ran until it launched the kernel (operators and frames, nested)
                thread, at = host.get(key, []), starts.get(key, [])
                inside = thread[bisect.bisect_right(at, end):bisect.bisect_left(at, launch["ts"])]
                for e in enclosing(key, end) + inside:
                    by_op[e["name"]] += max(0.0, min(e["ts"] + e["dur"], launch["ts"]) - max(e["ts"], end))
        end = max(end or 0.0, k["ts"] + k["dur"])
    return by_frame, by_op, total, busy


def report(path: str, min_gap_us: float = 10.0, top: int = 25, steps: int = 1) -> None:
    by_frame, by_op, total, busy = gaps(load(path), min_gap_us)
    print(f"GPU busy {busy / 1e3 / steps:.1f} ms, idle in gaps >= {min_gap_us:g} us "
          f"{total / 1e3 / steps:.1f} ms per step")
    titles = ("launching frame", "host operator or frame before the launch (nested, so they overlap)")
    for title, table in zip(titles, (by_frame, by_op)):
        print(f"\n| idle ms per step | {title} |\n|---|---|")
        for name, us in sorted(table.items(), key=lambda x: -x[1])[:top]:
            print(f"| {us / 1e3 / steps:.2f} | {name[:140]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--min_gap_us", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--steps", type=int, default=1, help="steps in the trace (tables are per step)")
    args = ap.parse_args()
    report(args.trace, args.min_gap_us, args.top, args.steps)


if __name__ == "__main__":
    main()
