"""benchmarks/host_gaps.py: GPU idle gaps of a profiler trace are blamed on the host code that launched the
kernel ending each gap."""
import json

from benchmarks.host_gaps import gaps, load


def _span(cat, name, ts, dur, tid=1, correlation=None):
    event = {"ph": "X", "cat": cat, "name": name, "pid": 0 if cat == "kernel" else 1, "tid": tid, "ts": ts, "dur": dur,
             "args": {}}
    if correlation is not None:
        event["args"]["correlation"] = correlation
    return event


def test_gaps_are_blamed_on_the_frame_that_launched_the_next_kernel(tmp_path):
    events = [
        _span("kernel", "k1", 0, 10, tid=7, correlation=1),
        _span("kernel", "k2", 110, 10, tid=7, correlation=2),  # 100 us idle before it
        _span("kernel", "k3", 125, 5, tid=7, correlation=3),  # 5 us: below the threshold
        _span("cuda_runtime", "cudaLaunchKernel", 0, 1, correlation=1),
        _span("cuda_runtime", "cudaLaunchKernel", 105, 1, correlation=2),
        _span("cuda_runtime", "cudaLaunchKernel", 121, 1, correlation=3),
        _span("python_function", "torch/nn/modules/module.py(1): _call_impl", 15, 110),
        _span("python_function", "kernels/hsa/parallel.py(60): block_union", 20, 100),
        _span("cpu_op", "aten::sort", 30, 50),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    by_frame, by_op, idle, busy = gaps(load(str(path)), min_gap_us=10)
    assert idle == 100 and busy == 25
    assert by_frame == {"kernels/hsa/parallel.py(60): block_union": 100}
    # from the gap start (10) to the launch (105): the sort ran 50 us, the project frame 85, the outer one 90
    assert by_op["aten::sort"] == 50
    assert by_op["kernels/hsa/parallel.py(60): block_union"] == 85
    assert by_op["torch/nn/modules/module.py(1): _call_impl"] == 90
