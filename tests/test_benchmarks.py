"""Smoke test of the benchmark harness (bench/benchmarks.py) on a tiny model: every stage runs, failures are rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from conftest import script

benchmarks = script("bench/benchmarks.py")

FEED = {"X": np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)}


def export(path: Path) -> None:
    """Y = relu(X @ W1) @ W2, W1 [128, 256], W2 [256, 64]: large enough that the sizes of files, not of their few KB of
    decoder functions, decide which is smaller."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) / 10, name)
               for name, shape in (("W1", (128, 256)), ("W2", (256, 64)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W1"], ["H"]), helper.make_node("Relu", ["H"], ["R"]),
         helper.make_node("MatMul", ["R", "W2"], ["Y"])],
        "tiny", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 128])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 64])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def evaluate(original: Path, compressed: Path) -> dict[str, float]:
    a, b = (ort.InferenceSession(str(p)).run(None, FEED)[0] for p in (original, compressed))
    return {"cosine": float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))}


TINY = benchmarks.ModelSpec(
    "tiny", "a tiny MLP", "tiny.onnx", export, evaluate,
    (benchmarks.Metric("cosine", lambda r: r["cosine"], True),), ((1, 1), (4, 1)),
    calibration=lambda: [FEED], runs=2)
METHODS = (
    benchmarks.Method("jlcm-onnx 4-bit", "jlcm", {"bits": 4, "min_elements": 64}),
    benchmarks.Method("jlcm-onnx 2-bit, calibrated", "jlcm", {"bits": 2, "min_elements": 64}, calibrated=True),
    benchmarks.Method("ORT RTN 4-bit, block 32", "ort-nbits", {"algorithm": "rtn", "bits": 4, "block": 32}),
    benchmarks.Method("ORT broken", "no-such-tool"),
)


def test_the_harness_runs_end_to_end_and_reports_failures_as_rows(tmp_path):
    result = benchmarks.run_model(TINY, METHODS, tmp_path / "build", tmp_path, lambda text: None)
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["fp32 (original)", *(m.label for m in METHODS)]
    assert rows["fp32 (original)"]["metrics"]["cosine"] > 0.9999 and rows["fp32 (original)"]["ratio"] == 1.0
    for label in ("jlcm-onnx 4-bit", "jlcm-onnx 2-bit, calibrated", "ORT RTN 4-bit, block 32"):
        row = rows[label]
        assert row["ratio"] > 2 and 0.5 < row["metrics"]["cosine"] < 1.0, row
        assert row["compress_seconds"] > 0 and len(row["latency_ms"]) == 2 and row["load_peak_mb"] > 0
    assert rows["ORT broken"]["error"].startswith("ValueError: unknown tool")
    assert not list(tmp_path.glob("tiny-*.onnx"))  # compressed files are not left behind

    results = {"environment": benchmarks.environment(), "models": {"tiny": json.loads(json.dumps(result))}}
    report = tmp_path / "BENCHMARKS.md"
    benchmarks.write_report(results, {"tiny": TINY}, report, tmp_path / "plots")
    text = report.read_text()
    assert "| jlcm-onnx 4-bit |" in text and "| ORT broken | failed: ValueError" in text
    assert "ORT RTN 4-bit, block 32 (" in text and ("**wins**" in text or "**loses**" in text)
    assert (tmp_path / "plots" / "tiny-pareto.png").stat().st_size > 1000
    table = benchmarks.headline_table(results, {"tiny": TINY})
    assert "| tiny | jlcm-onnx 4-bit |" in table and "| tiny | ORT RTN 4-bit, block 32 |" in table
    assert "calibrated" not in table  # not a headline row


def test_pareto_keeps_rows_no_smaller_row_beats():
    metric = benchmarks.Metric("q", lambda r: r["q"], True)
    rows = [{"method": name, "bytes": size, "metrics": {"q": q}}
            for name, size, q in (("a", 10, 0.9), ("b", 20, 0.95), ("c", 30, 0.93), ("d", 5, 0.5))]
    assert [r["method"] for r in benchmarks.pareto(rows, metric)] == ["a", "b", "d"]


def test_a_partial_rerun_replaces_only_its_own_rows_in_method_order():
    first, second = (m.label for m in benchmarks.METHODS[:2])
    previous = [{"method": "fp32 (original)", "bytes": 1}, {"method": second, "bytes": 2},
                {"method": "a method since removed", "bytes": 3}]
    fresh = [{"method": "fp32 (original)", "bytes": 10}, {"method": first, "bytes": 20}]
    merged = benchmarks.merge_rows(previous, fresh)
    assert [(row["method"], row["bytes"]) for row in merged] == [("fp32 (original)", 10), (first, 20), (second, 2)]


def test_a_partial_rerun_keeps_each_rows_latency_ratio_to_its_own_runs_dense_model():
    """A rerun on a busier machine measures a slower fp32 model; rows from before keep their ratio to the old one."""
    first, second = (m.label for m in benchmarks.METHODS[:2])
    previous = [{"method": "fp32 (original)", "latency_ms": [5.0, 50.0]},
                {"method": second, "latency_ms": [10.0, 60.0]}]
    fresh = [{"method": "fp32 (original)", "latency_ms": [15.0, 150.0]},
             {"method": first, "latency_ms": [30.0, 300.0], "dense_latency_ms": [15.0, 150.0]}]
    result = {"rows": benchmarks.merge_rows(previous, fresh)}
    ratios = {row["method"]: [a / b for a, b in zip(row["latency_ms"], benchmarks.dense_latency(row, result),
                                                     strict=True)] for row in result["rows"]}
    assert ratios == {"fp32 (original)": [1.0, 1.0], first: [2.0, 2.0], second: [2.0, 1.2]}


def test_verdicts_say_wins_ties_and_loses_against_each_peer():
    def row(method: str, size: int, cosine: float) -> dict:
        return {"method": method, "bytes": size, "ratio": 100 / size, "metrics": {"cosine": cosine}}

    result = {"rows": [row("jlcm-onnx a", 10, 0.95), row("ORT smaller", 5, 0.9), row("ORT tie", 20, 0.95),
                       row("ORT better", 30, 0.99), row("ORT worse", 40, 0.5)]}
    lines = benchmarks.verdicts(TINY, result)
    assert [line.split("**")[1] for line in lines[1:]] == ["ties", "loses", "wins"]
    assert "no jlcm-onnx row is this small" in lines[0]
