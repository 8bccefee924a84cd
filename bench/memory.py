"""Memory and latency of ONNX models in onnxruntime (CPU), each measured in a fresh process.

For every model a new Python interpreter is started (``subprocess`` running this file in worker mode), so nothing is
shared between measurements: no allocator arenas, no cached pages of the previous model, no imported modules beyond
what the worker needs. The worker:

1. imports numpy and onnxruntime, builds the inputs and records the **baseline** resident set size (``VmRSS``);
2. resets the peak counter (``VmHWM``, via ``/proc/self/clear_refs``; Linux >= 4.0) and creates an
   ``InferenceSession`` with *default* ``SessionOptions`` (only ``intra_op_num_threads`` fixed) on the CPU provider;
   the peak reached while loading is the **load peak**;
3. resets the peak counter again, runs ``warmup`` + ``runs`` inferences and records the current RSS afterwards
   (**steady**) and the peak reached during inference (**inference peak**), plus the median latency of the timed runs.

All memory figures are reported raw (bytes, as the kernel counts them) and *net* (minus the baseline), which is what
the model itself costs. Where ``clear_refs`` cannot be written the peaks are the process-lifetime ``VmHWM``, which is
still correct for the load peak (imports peak far lower than a model load) and an upper bound for the inference peak.

The default input is a batch of 8 sequences of 64 tokens: deterministic pseudo-random word-piece ids framed by
``[CLS]``/``[SEP]``, an all-ones attention mask and all-zero token types. Only the inputs the session declares are fed;
any other input gets zeros (integers) or standard-normal values (floats), symbolic dimensions taking ``batch`` for the
first axis and ``seq`` for the others.

``--folding`` additionally checks whether onnxruntime constant-folded a compressed model's decode subgraph back into
dense weights: it saves the graph onnxruntime optimised at load time (default optimisation level) and counts its
``GatherElements`` nodes and the bytes of its float initializers.

Command line::

    python bench/memory.py MODEL.onnx [MODEL2.onnx ...] [--runs N] [--threads T] [--json OUT.json] [--folding]

Library::

    from bench.memory import measure
    result = measure("model.onnx", runs=5)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MB = 1024 * 1024
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
DEFAULT_THREADS = 2
DEFAULT_BATCH = 8
DEFAULT_SEQ = 64
#: BERT word-piece vocabulary: ids below FIRST_WORD_ID are special/unused tokens.
CLS_ID, SEP_ID, FIRST_WORD_ID, VOCAB_SIZE = 101, 102, 1996, 30522
WORKER_FLAG = "--_worker"


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------


def measure(
    path: str | os.PathLike,
    *,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    threads: int = DEFAULT_THREADS,
    batch: int = DEFAULT_BATCH,
    seq: int = DEFAULT_SEQ,
    timeout: float | None = 600.0,
) -> dict[str, Any]:
    """Measures one model in a fresh Python process and returns its figures.

    Args:
        path: the ``.onnx`` file (external data, if any, next to it).
        runs: timed inferences (the latency is their median); at least 1.
        warmup: untimed inferences before the timed ones.
        threads: ``SessionOptions.intra_op_num_threads``.
        batch, seq: values of the symbolic input dimensions (batch for axis 0, seq for the others).
        timeout: seconds the worker may take.

    Returns:
        A dict with ``model``, ``file_bytes`` and, in bytes, ``baseline_rss``, ``load_peak`` / ``load_peak_net``,
        ``after_load_rss`` / ``after_load_net``, ``steady_rss`` / ``steady_net``, ``inference_peak`` /
        ``inference_peak_net``; latencies in milliseconds (``latency_ms_median``, ``latency_ms_min``,
        ``latency_ms_max``); the settings used; ``peak_reset`` (whether the peak counter could be reset between
        phases) and ``onnxruntime`` (its version).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        RuntimeError: if the worker fails.
    """
    model = Path(path)
    if not model.is_file():
        raise FileNotFoundError(model)
    if runs < 1:
        raise ValueError("runs must be at least 1")
    settings = {"model": str(model.resolve()), "runs": runs, "warmup": warmup, "threads": threads,
                "batch": batch, "seq": seq}
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, json.dumps(settings)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"measuring {model} failed (exit {completed.returncode}):\n{completed.stderr.strip()}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    result["model"] = str(model)
    result["file_bytes"] = model.stat().st_size
    return result


def folding_stats(path: str | os.PathLike) -> dict[str, Any]:
    """What onnxruntime's load-time optimisation (default level) leaves of a model's graph.

    Creates a session (CPU, default options) with ``optimized_model_filepath`` set, reloads the saved graph and counts
    its ``GatherElements`` nodes and float initializers. If a compressed model's decode subgraph were constant-folded,
    its ``GatherElements`` would be gone and the float initializers would be as large as the original weights.

    Returns:
        ``nodes``, ``gather_elements``, ``float_initializers``, ``float_initializer_bytes``,
        ``initializer_bytes`` (all dtypes) and ``optimization_level``.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # silence the "hardware specific optimizations" warning when saving
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized)).graph
        level = str(options.graph_optimization_level)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE}
    float_inits = [t for t in graph.initializer if t.data_type in float_types]
    return {
        "nodes": len(graph.node),
        "gather_elements": sum(node.op_type == "GatherElements" for node in graph.node),
        "float_initializers": len(float_inits),
        "float_initializer_bytes": sum(_tensor_bytes(t) for t in float_inits),
        "initializer_bytes": sum(_tensor_bytes(t) for t in graph.initializer),
        "optimization_level": level,
    }


def _tensor_bytes(tensor: Any) -> int:
    from onnx import helper

    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`measure` results (memory in MiB, latency in ms)."""
    header = ("model", "file MB", "baseline MB", "load peak net MB", "steady net MB", "infer peak net MB",
              "latency ms")
    rows = [header]
    for r in results:
        rows.append((
            Path(r["model"]).name,
            f"{r['file_bytes'] / MB:.1f}",
            f"{r['baseline_rss'] / MB:.1f}",
            f"{r['load_peak_net'] / MB:.1f}",
            f"{r['steady_net'] / MB:.1f}",
            f"{r['inference_peak_net'] / MB:.1f}",
            f"{r['latency_ms_median']:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Worker side (runs in the fresh process)
# --------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, in bytes."""
    values: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _reset_peak() -> bool:
    """Resets ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def make_inputs(session: Any, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """Fixed inputs for every input ``session`` declares (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_WORD_ID, VOCAB_SIZE, size=(batch, seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    known = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feeds: dict[str, Any] = {}
    for arg in session.get_inputs():
        shape = tuple(d if isinstance(d, int) and d > 0 else (batch if i == 0 else seq)
                      for i, d in enumerate(arg.shape))
        dtype = np.dtype(_ORT_TYPES.get(arg.type, "float32"))
        if arg.name in known and known[arg.name].shape == shape:
            feeds[arg.name] = known[arg.name].astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = np.zeros(shape, dtype=dtype)
    return feeds


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _worker(settings: dict[str, Any]) -> dict[str, Any]:
    """The measurement itself; must run in a fresh process (see the module docstring)."""
    import statistics
    import time

    import numpy as np  # noqa: F401  (part of the baseline)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = settings["threads"]
    baseline = _proc_status()["VmRSS"]
    reset = _reset_peak()

    session = ort.InferenceSession(settings["model"], options, providers=["CPUExecutionProvider"])
    after_load = _proc_status()
    feeds = make_inputs(session, settings["batch"], settings["seq"])

    reset = _reset_peak() and reset
    for _ in range(settings["warmup"]):
        session.run(None, feeds)
    latencies = []
    for _ in range(settings["runs"]):
        started = time.perf_counter()
        session.run(None, feeds)
        latencies.append((time.perf_counter() - started) * 1000.0)
    after_runs = _proc_status()

    return {
        "onnxruntime": ort.__version__,
        "threads": settings["threads"], "runs": settings["runs"], "warmup": settings["warmup"],
        "batch": settings["batch"], "seq": settings["seq"],
        "peak_reset": reset,
        "baseline_rss": baseline,
        "load_peak": after_load["VmHWM"], "load_peak_net": after_load["VmHWM"] - baseline,
        "after_load_rss": after_load["VmRSS"], "after_load_net": after_load["VmRSS"] - baseline,
        "steady_rss": after_runs["VmRSS"], "steady_net": after_runs["VmRSS"] - baseline,
        "inference_peak": after_runs["VmHWM"], "inference_peak_net": after_runs["VmHWM"] - baseline,
        "latency_ms_median": statistics.median(latencies),
        "latency_ms_min": min(latencies), "latency_ms_max": max(latencies),
    }


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Measures the models on the command line, prints a table and optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX model files, each measured in a fresh process")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed inferences per model (median reported)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed inferences first")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="intra_op_num_threads")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="batch size of the input")
    parser.add_argument("--seq", type=int, default=DEFAULT_SEQ, help="sequence length of the input")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="also write all figures to this file")
    parser.add_argument("--folding", action="store_true",
                        help="also report GatherElements nodes and float initializer bytes of the graph onnxruntime "
                             "optimised at load time (detects constant-folding of the decode subgraph)")
    args = parser.parse_args(argv)

    results = []
    for model in args.models:
        result = measure(model, runs=args.runs, warmup=args.warmup, threads=args.threads,
                         batch=args.batch, seq=args.seq)
        if args.folding:
            result["folding"] = folding_stats(model)
        results.append(result)
    print(format_table(results))
    if not all(r["peak_reset"] for r in results):
        print("note: could not reset VmHWM; peaks are process-lifetime peaks", file=sys.stderr)
    if args.folding:
        print()
        for r in results:
            f = r["folding"]
            print(f"{Path(r['model']).name}: optimised graph has {f['nodes']} nodes, {f['gather_elements']} "
                  f"GatherElements, {f['float_initializers']} float initializers "
                  f"({f['float_initializer_bytes'] / MB:.1f} MB of {f['initializer_bytes'] / MB:.1f} MB)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
