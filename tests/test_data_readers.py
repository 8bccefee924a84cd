"""Large float tensors read as plain data (Add/Sub/Mul/Div/Where/Concat/Slice) are compressed like weights: rows along
their first axis of more than one element, decoded exactly, left dense with a reason where that would not pay."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.config import DATA_READERS, WEIGHT_SLOTS

from conftest import FLOAT, check_full, dequantized, make_model, replace_initializer, run, tensor, value

CONFIG = CompressionConfig(bits=3, min_elements=64)


def positional_model(table: np.ndarray, op: str = "Add") -> onnx.ModelProto:
    """X [N, positions, width] op= a learned [1, positions, width] table."""
    _, positions, width = table.shape
    return make_model([helper.make_node(op, ["X", "table"], ["Y"])],
                      [value("X", FLOAT, ["N", positions, width])], [value("Y", FLOAT, ["N", positions, width])],
                      [tensor("table", table)])


def sliced_cell_model(weight: np.ndarray) -> onnx.ModelProto:
    """A hand-written cell: the rows of W [3 * hidden, inputs] cut in three gates by Slice, each used as a MatMul B
    after a Transpose (what silero-vad's exported decoder does)."""
    hidden = weight.shape[0] // 3
    nodes, initializers, outputs = [], [tensor("W", weight)], []
    for gate in range(3):
        bounds = {"starts": [gate * hidden], "ends": [(gate + 1) * hidden], "axes": [0]}
        for key, bound in bounds.items():
            initializers.append(tensor(f"{key}{gate}", np.array(bound, dtype=np.int64)))
        nodes += [helper.make_node("Slice", ["W", f"starts{gate}", f"ends{gate}", f"axes{gate}"], [f"W{gate}"]),
                  helper.make_node("Transpose", [f"W{gate}"], [f"T{gate}"], perm=[1, 0]),
                  helper.make_node("MatMul", ["X", f"T{gate}"], [f"Y{gate}"])]
        outputs.append(value(f"Y{gate}", FLOAT, ["N", hidden]))
    return make_model(nodes, [value("X", FLOAT, ["N", weight.shape[1]])], outputs, initializers)


@pytest.mark.parametrize("op", ["Add", "Mul", "Sub", "Div"])
def test_positional_table_decodes_exactly(op: str, rng: np.random.Generator) -> None:
    table = rng.standard_normal((1, 48, 32)).astype(np.float32) + (3.0 if op == "Div" else 0.0)
    model = positional_model(table, op)
    result = jlcm_onnx.compress(model, CONFIG)
    (record,) = result.report.compressed
    assert record.name == "table" and record.layer.endswith(f"({op})")
    check_full(result.model)
    expected = replace_initializer(model, "table", dequantized(table, 1, CONFIG))  # rows: the 48 positions
    feed = {"X": rng.standard_normal((2, 48, 32)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feed)[0], run(expected, feed)[0], rtol=1e-5, atol=1e-6)


def test_weights_cut_by_slice_are_compressed(rng: np.random.Generator) -> None:
    weight = rng.standard_normal((96, 40)).astype(np.float32)
    model = sliced_cell_model(weight)
    result = jlcm_onnx.compress(model, CONFIG)
    (record,) = result.report.compressed
    assert record.name == "W" and record.layer.endswith("(Slice)")
    assert record.decode_gate == "X"  # decoded on every run, not folded to a dense tensor at load
    check_full(result.model)
    expected = replace_initializer(model, "W", dequantized(weight, 0, CONFIG))
    feed = {"X": rng.standard_normal((3, 40)).astype(np.float32)}
    for got, want in zip(run(result.model, feed), run(expected, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_concat_and_where_read_tables(rng: np.random.Generator) -> None:
    prefix, fallback = (rng.standard_normal((16, 32)).astype(np.float32) for _ in range(2))
    model = make_model(
        [helper.make_node("Concat", ["prefix", "X"], ["C"], axis=0),
         helper.make_node("Greater", ["C", "zero"], ["positive"]),
         helper.make_node("Concat", ["fallback", "fallback"], ["fallback_rows"], axis=0),
         helper.make_node("Where", ["positive", "C", "fallback_rows"], ["Y"])],
        [value("X", FLOAT, [16, 32])], [value("Y", FLOAT, [32, 32])],
        [tensor("prefix", prefix), tensor("fallback", fallback), tensor("zero", np.zeros((), np.float32))])
    result = jlcm_onnx.compress(model, CONFIG)
    assert sorted(r.name for r in result.report.compressed) == ["fallback", "prefix"]
    expected = replace_initializer(replace_initializer(model, "prefix", dequantized(prefix, 0, CONFIG)),
                                   "fallback", dequantized(fallback, 0, CONFIG))
    feed = {"X": rng.standard_normal((16, 32)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feed)[0], run(expected, feed)[0], rtol=1e-5, atol=1e-6)


def test_a_weight_input_decides_the_rows_over_a_data_reader(rng: np.random.Generator) -> None:
    """W [32, 48] is MatMul's B (rows: its 48 output columns) and also added to a [32, 48] input."""
    weight = rng.standard_normal((32, 48)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"]), helper.make_node("Add", ["Z", "W"], ["S"])],
                       [value("X", FLOAT, ["N", 32]), value("Z", FLOAT, [32, 48])],
                       [value("Y", FLOAT, ["N", 48]), value("S", FLOAT, [32, 48])], [tensor("W", weight)])
    config = CompressionConfig(bits=3, min_elements=64, reorder=False)
    result = jlcm_onnx.compress(model, config)
    assert [r.name for r in result.report.compressed] == ["W"]
    expected = replace_initializer(model, "W", dequantized(weight, 1, config))
    feed = {"X": rng.standard_normal((2, 32)).astype(np.float32), "Z": np.zeros((32, 48), np.float32)}
    for got, want in zip(run(result.model, feed), run(expected, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shape", "fill", "reason"), [
    ((1, 1, 256), None, "a vector or a broadcast row of shape [1, 1, 256] read by Add"),
    ((1, 16, 16), -np.inf, "infinite or NaN"),
    ((1, 16, 16), np.nan, "infinite or NaN"),
])
def test_vectors_and_masks_stay_dense(shape: tuple, fill: float | None, reason: str,
                                      rng: np.random.Generator) -> None:
    table = rng.standard_normal(shape).astype(np.float32)
    if fill is not None:
        table[0, np.triu_indices(16, 1)[0], np.triu_indices(16, 1)[1]] = fill  # a causal mask's upper triangle
    result = jlcm_onnx.compress(positional_model(table), CONFIG)
    (record,) = result.report.tensors
    assert record.status == "skipped" and reason in record.reason


def test_biases_of_weight_readers_say_so(rng: np.random.Generator) -> None:
    bias = rng.standard_normal((2, 256)).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["X", "W", "B"], ["Y"])], [value("X", FLOAT, [2, 64])],
                       [value("Y", FLOAT, [2, 256])],
                       [tensor("W", rng.standard_normal((64, 256)).astype(np.float32)), tensor("B", bias)])
    records = {r.name: r for r in jlcm_onnx.compress(model, CONFIG).report.tensors}
    assert records["W"].status == "compressed"
    assert records["B"].status == "skipped" and "input 2 of Gemm" in records["B"].reason
    assert "a bias or a state, not a weight" in records["B"].reason


def test_data_readers_can_be_left_out(rng: np.random.Generator) -> None:
    config = CompressionConfig(bits=3, min_elements=64, op_types=tuple(WEIGHT_SLOTS))
    result = jlcm_onnx.compress(positional_model(rng.standard_normal((1, 48, 32)).astype(np.float32)), config)
    (record,) = result.report.tensors
    assert record.status == "skipped" and "read by Add" in record.reason
    assert set(DATA_READERS) <= set(CompressionConfig().op_types)


def test_calibrated_and_fast_runs_fit_data_readers_without_statistics(rng: np.random.Generator) -> None:
    """Calibration collects no statistics for data (fitted to the weights alone); the fast path dequantises it."""
    weight = rng.standard_normal((384, 256)).astype(np.float32)
    model = sliced_cell_model(weight)
    feeds = [{"X": rng.standard_normal((8, 256)).astype(np.float32)} for _ in range(2)]
    for settings in ({"bits": 3}, {"speed": "fast", "bits": 4}, {"target_bits_per_weight": 3.5}):
        result = jlcm_onnx.compress(model, CompressionConfig(min_elements=64, **settings), feeds)
        (record,) = result.report.compressed
        assert record.name == "W"
        for got, want in zip(run(result.model, feeds[0]), run(model, feeds[0]), strict=True):
            assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95
