"""What each weight format costs at run time: one layer ``Y = X @ W`` compressed every way, timed in onnxruntime.

Every file is made by ``jlcm_onnx.compress`` from the same fp32 layer (W [K, N] standard normal), so each row is the
format as users get it: ``speed="small"`` (one codebook per output row, the weight decoded by BitShift +
GatherElements on every run, in column blocks; and vector codebooks, one Gather of codewords per D inputs) and
``speed="fast"`` (affine blocks, a standard DequantizeLinear that onnxruntime fuses with the MatMul into MatMulNBits)
at each bits and block size. Each is timed with default session options and 2 intra-op threads (median of ``RUNS``
after warm-up), at M = 1 and 16 rows of X, and reported as milliseconds, nanoseconds per weight and a multiple of the
dense layer's time measured in the same run; the fused rows also at ``session.qdq_matmulnbits_accuracy_level=0``
(float activations; onnxruntime's default, 4, quantizes the activations of the fused kernel to int8).

Run: ``python bench/decode_speed.py`` (about a minute); writes ``bench/results/decode_speed.json``, which
``bench/benchmarks.py`` renders into BENCHMARKS.md, and the package's cost model ``jlcm_onnx/data/run_costs.json``
(nanoseconds per weight at one row), which speed 'balanced' plans with.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import jlcm_onnx

RESULTS = Path(__file__).resolve().parent / "results" / "decode_speed.json"
#: The cost model speed 'balanced' plans with (:mod:`jlcm_onnx.pipeline.run_costs`), written from the same rows.
COSTS = Path(__file__).resolve().parents[1] / "jlcm_onnx" / "data" / "run_costs.json"
K = N = 1536
ROWS = (1, 16)
RUNS, WARMUP, THREADS = 50, 5, 2
SMALL_BITS = (2, 3, 4, 8)
#: (bits, vector_dim) of the vector codebooks measured.
VECTORS = ((3, 2), (2, 4))
FAST = ((2, 32), (2, 64), (2, 128), (4, 16), (4, 32), (4, 64), (4, 128), (8, 32), (8, 128))


def layer() -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="layer")], "layer",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def median_ms(model: onnx.ModelProto, rows: int, accuracy_level: int | None = None) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    if accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"X": np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)}
    for _ in range(WARMUP):
        session.run(None, feed)
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def formats(dense: onnx.ModelProto) -> list[tuple[str, dict[str, Any], onnx.ModelProto]]:
    """(label, kind, file) of every format measured; the kind names the format for the cost model (``kind``:
    dense, codebook, vector or fused, with its ``bits`` and ``block`` or ``dim``)."""
    made = [("dense fp32", {"kind": "dense"}, dense)]
    for bits in SMALL_BITS:
        config = jlcm_onnx.CompressionConfig(bits=bits)
        made.append((f"small, {bits}-bit codebooks", {"kind": "codebook", "bits": bits},
                     jlcm_onnx.compress(dense, config).model))
    for bits, dim in VECTORS:
        config = jlcm_onnx.CompressionConfig(bits=bits, vector_dim=dim)
        made.append((f"small, {bits}-bit vector codebooks of {dim}", {"kind": "vector", "bits": bits, "dim": dim},
                     jlcm_onnx.compress(dense, config).model))
    for bits, block in FAST:
        config = jlcm_onnx.CompressionConfig(bits=bits, speed="fast", block_size=block)
        made.append((f"fast, {bits}-bit, blocks of {block}", {"kind": "fused", "bits": bits, "block": block},
                     jlcm_onnx.compress(dense, config).model))
    return made


def measure() -> dict[str, Any]:
    dense = layer()
    rows = []
    for label, kind, model in formats(dense):
        row = {"format": label, **kind, "bytes": model.ByteSize(), "ms": {str(m): median_ms(model, m) for m in ROWS}}
        if kind["kind"] == "fused":
            row["ms_float_activations"] = {str(m): median_ms(model, m, accuracy_level=0) for m in ROWS}
        rows.append(row)
        print(label, row["ms"], flush=True)
    return {"shape": [K, N], "rows": rows, "onnxruntime": ort.__version__, "threads": THREADS, "runs": RUNS}


def cost_model(result: dict[str, Any]) -> dict[str, Any]:
    """The package's cost model (:mod:`jlcm_onnx.pipeline.run_costs`): nanoseconds per weight at one row."""
    weights = result["shape"][0] * result["shape"][1]

    def ns(row: dict[str, Any]) -> float:
        return round(row["ms"]["1"] * 1e6 / weights, 4)

    rows = result["rows"]
    fused: dict[str, dict[str, float]] = {}
    for row in (r for r in rows if r["kind"] == "fused"):
        fused.setdefault(str(row["bits"]), {})[str(row["block"])] = ns(row)
    return {
        "measured_by": "python bench/decode_speed.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime {result['onnxruntime']}, "
                   f"{result['threads']} threads, {date.today().isoformat()}",
        "layer": result["shape"],
        "dense": next(ns(r) for r in rows if r["kind"] == "dense"),
        "codebook": {str(r["bits"]): ns(r) for r in rows if r["kind"] == "codebook"},
        "fused": fused,
    }


def table(result: dict[str, Any]) -> list[str]:
    """The markdown table of :func:`measure`'s result."""
    weights = result["shape"][0] * result["shape"][1]
    dense = result["rows"][0]["ms"]
    head = ["format", "MB", *(f"ms @M={m}" for m in dense), *(f"ns/weight @M={m}" for m in dense),
            *(f"x dense @M={m}" for m in dense), *(f"x dense @M={m}, float act." for m in dense)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        floats = row.get("ms_float_activations")
        cells = [row["format"], f"{row['bytes'] / 1e6:.2f}", *(f"{row['ms'][m]:.3f}" for m in dense),
                 *(f"{row['ms'][m] * 1e6 / weights:.3f}" for m in dense),
                 *(f"{row['ms'][m] / dense[m]:.2f}" for m in dense),
                 *((f"{floats[m] / dense[m]:.2f}" if floats else "") for m in dense)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    result = measure()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    COSTS.write_text(json.dumps(cost_model(result), indent=2) + "\n")
    print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
