"""Neuron grouping: rows clustered by distribution, re-ordered into contiguous groups (folded into the graph or restored
by a Gather), multi-codebook and multi-scaling encodings. Equivalence where it must hold, and the relative claims."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.analysis.grouping import RowClusterings, cluster_rows
from jlcm_onnx.analysis.plan import CompressionPlan, TensorChoice
from jlcm_onnx.encodings.codebook import encode_matrix, equal_group_sizes
from jlcm_onnx.encodings.multi_scaling import encode_scaled_matrix
from jlcm_onnx.encodings.sqnr import sqnr_db
from jlcm_onnx.passes.reorder_neurons import ReorderNeurons

from conftest import FLOAT, check_full, make_model, run, tensor, value

HIDDEN, INNER = 32, 64


def mixed_scale_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Rows [rows, cols] whose scale alternates 1, 10, 1, 10, ...: contiguous halves mix both scales, clusters don't."""
    scales = np.where(np.arange(rows) % 2 == 0, 1.0, 10.0)
    return (rng.standard_normal((rows, cols)) * scales[:, None]).astype(np.float32)


def ffn_model(rng: np.random.Generator, residual: bool) -> onnx.ModelProto:
    """X @ W1 + b1 -> Relu -> @ W2 (-> + X when ``residual``): W1's rows fold into W2; W2's rows hit the residual."""
    up = mixed_scale_rows(rng, INNER, HIDDEN).T.copy()  # MatMul B [in, out]: rows are the out axis
    down = mixed_scale_rows(rng, HIDDEN, INNER).T.copy()
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"]),
        helper.make_node("Add", ["H", "b1"], ["Hb"]),
        helper.make_node("Relu", ["Hb"], ["A"]),
        helper.make_node("MatMul", ["A", "W2"], ["Y0" if residual else "Y"]),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["Y0", "X"], ["Y"]))
    bias = rng.standard_normal(INNER).astype(np.float32)
    return make_model(nodes, [value("X", FLOAT, ["N", HIDDEN])], [value("Y", FLOAT, ["N", HIDDEN])],
                      [tensor("W1", up), tensor("b1", bias), tensor("W2", down)])


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_cluster_rows_separates_scales(rng: np.random.Generator) -> None:
    matrix = mixed_scale_rows(rng, 40, 64)
    groups = cluster_rows(matrix, 2)
    assert sorted(groups.permutation.tolist()) == list(range(40))
    assert groups.sizes == (20, 20)
    assert set(groups.permutation[:20] % 2) == {0} and set(groups.permutation[20:] % 2) == {1}


def test_row_clusterings_are_computed_once_and_ignore_the_column_order(rng: np.random.Generator) -> None:
    matrix = mixed_scale_rows(rng, 40, 24)
    clusterings = RowClusterings()
    first = clusterings.cluster("w", matrix, 4)
    expected = cluster_rows(matrix, 4)
    assert np.array_equal(first.permutation, expected.permutation) and first.sizes == expected.sizes
    shuffled = matrix[:, rng.permutation(24)]  # a later run: the previous layer's permutation folded into the columns
    again = RowClusterings()
    assert np.array_equal(again.cluster("w", shuffled, 4).permutation, expected.permutation)
    assert clusterings.cluster("w", shuffled, 4) is first
    assert clusterings.cluster("w", matrix, 2).sizes == cluster_rows(matrix, 2).sizes


@pytest.mark.parametrize("residual", [False, True])
def test_reorder_pass_alone_keeps_outputs(rng: np.random.Generator, residual: bool) -> None:
    model = ffn_model(rng, residual)
    working = onnx.ModelProto()
    working.CopyFrom(model)
    config = CompressionConfig(groups=2, min_elements=64)
    plan = CompressionPlan(config)
    ReorderNeurons(config, plan)(working)
    assert plan.groupings["W1"].reordered and plan.groupings["W1"].stored_order is None
    first = onnx.numpy_helper.to_array(working.graph.initializer[0])
    assert not np.array_equal(first, onnx.numpy_helper.to_array(model.graph.initializer[0]))  # really permuted
    assert not plan.groupings["W2"].reordered  # its output is the graph output or the residual stream
    feeds = {"X": rng.standard_normal((5, HIDDEN)).astype(np.float32)}
    np.testing.assert_allclose(run(working, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_grouped_reordered_beats_contiguous(rng: np.random.Generator, residual: bool) -> None:
    """At the same bits and groups, clustered groups beat contiguous ones (weight SQNR and output error)."""
    model = ffn_model(rng, residual)
    feeds = {"X": rng.standard_normal((64, HIDDEN)).astype(np.float32)}
    (reference,) = run(model, feeds)

    def compress(reorder: bool) -> tuple[float, float, list[jlcm_onnx.TensorRecord]]:
        result = jlcm_onnx.compress(model, CompressionConfig(bits=2, groups=2, min_elements=64, reorder=reorder))
        check_full(result.model)
        (out,) = run(result.model, feeds)
        records = result.report.compressed
        return float(np.mean((out - reference) ** 2)), float(np.mean([r.sqnr_db for r in records])), records

    plain_error, plain_sqnr, _ = compress(reorder=False)
    grouped_error, grouped_sqnr, records = compress(reorder=True)
    notes = {r.name: r.row_order for r in records}
    assert notes["W1"].startswith("re-ordered, folded into")
    assert notes["W2"].startswith("stored re-ordered, restored by a Gather")
    assert grouped_sqnr > plain_sqnr + 0.5  # measured +0.83 dB
    assert grouped_error < 0.8 * plain_error  # measured 0.66x


def test_restored_rows_decode_in_original_order(rng: np.random.Generator) -> None:
    """A blocked weight (its output is the graph output) is stored re-ordered and put back by a Gather."""
    weight = mixed_scale_rows(rng, 24, 16).T.copy()
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [value("X", FLOAT, ["N", 16])],
                       [value("Y", FLOAT, ["N", 24])], [tensor("W", weight)])
    config = CompressionConfig(bits=3, groups=2, min_elements=64, outlier_fraction=0.0)
    result = jlcm_onnx.compress(model, config)
    (record,) = result.report.compressed
    assert record.row_order.startswith("stored re-ordered")
    order = cluster_rows(weight.T, 2)
    encoded = encode_matrix(weight.T[order.permutation], 3, order.sizes, np.dtype(np.float16))
    expected = np.empty_like(weight.T)
    expected[order.permutation] = encoded.decode()
    (decoded,) = run(result.model, {"X": np.eye(16, dtype=np.float32)})
    np.testing.assert_array_equal(decoded, expected.T)


def test_multi_scaling_beats_one_codebook(rng: np.random.Generator) -> None:
    """One shared codebook with a scale per row beats one codebook for the tensor, for a fraction of per-row cost."""
    matrix = (rng.standard_normal((64, 128)) * rng.uniform(0.1, 10.0, size=(64, 1))).astype(np.float32)
    f16 = np.dtype(np.float16)
    single = encode_matrix(matrix, 3, equal_group_sizes(64, 1), f16)
    scaled = encode_scaled_matrix(matrix, 3, equal_group_sizes(64, None), f16)
    assert scaled.multi_scaling and scaled.scales.shape == (64,) and scaled.shared_codebook.shape == (8,)
    assert sqnr_db(matrix, scaled.decode()) > sqnr_db(matrix, single.decode()) + 1.0  # measured +1.8 dB


@pytest.mark.parametrize("groups", [None, 4, 3])
def test_multi_scaling_onnx_decoder(rng: np.random.Generator, groups: int | None) -> None:
    weight = (rng.standard_normal((16, 24)) * rng.uniform(0.5, 4.0, size=(1, 24))).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [value("X", FLOAT, ["N", 16])],
                       [value("Y", FLOAT, ["N", 24])], [tensor("W", weight)])
    config = CompressionConfig(bits=3, groups=groups, min_elements=64, encoding="multi-scaling", reorder=False,
                               outlier_fraction=0.0)
    result = jlcm_onnx.compress(model, config)
    (record,) = result.report.compressed
    assert record.encoding == "multi-scaling"
    check_full(result.model)
    expected = encode_scaled_matrix(weight.T, 3, equal_group_sizes(24, groups), np.dtype(np.float16)).decode().T
    (decoded,) = run(result.model, {"X": np.eye(16, dtype=np.float32)})
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-7)
    stored = 2 * 8 + 2 * (24 if groups is None else groups)  # fp16 shared codebook and scales
    assert record.compressed_bytes == 16 * 24 * 3 // 8 + stored


def test_multi_scaling_rows_below_float16_range(rng: np.random.Generator) -> None:
    """A row whose scale rounds to 0 in float16 decodes to zeros instead of poisoning the shared codebook with NaN."""
    matrix = rng.standard_normal((8, 64)).astype(np.float32)
    matrix[3] *= 1e-8
    encoded = encode_scaled_matrix(matrix, 2, equal_group_sizes(8, None), np.dtype(np.float16), outlier_fraction=0.01)
    assert np.all(np.isfinite(encoded.decode()))
    assert sqnr_db(matrix, encoded.decode()) > 5.0


@pytest.mark.parametrize(("gate_groups", "expected"), [(4, None), (2, (32, 32)), (None, (1,) * 64)])
def test_a_sibling_keeps_the_group_count_planned_for_it(rng: np.random.Generator, gate_groups, expected) -> None:
    """The gate of a gated FFN follows the up projection's permutation; it shares the up projection's clusters only
    when planned with as many groups, else its own count is kept (what the size planner budgeted for)."""
    nodes = [helper.make_node("MatMul", ["X", "Wu"], ["U"]), helper.make_node("MatMul", ["X", "Wg"], ["G"]),
             helper.make_node("Sigmoid", ["G"], ["S"]), helper.make_node("Mul", ["G", "S"], ["Si"]),
             helper.make_node("Mul", ["U", "Si"], ["H"]), helper.make_node("MatMul", ["H", "Wd"], ["Y"])]
    weights = {"Wu": mixed_scale_rows(rng, 64, 32).T, "Wg": mixed_scale_rows(rng, 64, 32).T,
               "Wd": rng.standard_normal((64, 32))}
    model = make_model(nodes, [value("X", FLOAT, ["N", 32])], [value("Y", FLOAT, ["N", 32])],
                       [tensor(name, np.ascontiguousarray(w, dtype=np.float32)) for name, w in weights.items()])
    plan = CompressionPlan(CompressionConfig(min_elements=64),
                           choices={"Wu": TensorChoice(3, 4), "Wg": TensorChoice(3, gate_groups),
                                    "Wd": TensorChoice(3, None)})
    ReorderNeurons(CompressionConfig(min_elements=64), plan)(model)
    up, gate = plan.groupings["Wu"], plan.groupings["Wg"]
    assert gate.note == "rows permuted with Wu" and len(up.sizes) == 4
    assert gate.sizes == (up.sizes if expected is None else expected)
