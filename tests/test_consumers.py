"""End to end through ``compress``: every consumer kind, tied weights, Constant nodes, If bodies, fp16, groups, bits.

Each compressed model must pass the full ONNX check, run in onnxruntime, and compute what the original model computes
with each compressed weight replaced by its dequantized value; when a weight has at most 2**b distinct float16 values
per codebook group the compressed model must compute what the original computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.encodings.packing import WordLayout
from jlcm_onnx.encodings.sqnr import sqnr_db

from conftest import (
    FLOAT,
    FLOAT16,
    INT64,
    all_initializers,
    check_full,
    contains_array,
    dequantized,
    discrete_weight,
    expected_groups,
    make_model,
    matmul_model,
    replace_initializer,
    run,
    tensor,
    value,
)


@dataclass
class Weight:
    name: str
    array: np.ndarray
    row_axis: int


def records_by_name(result: jlcm_onnx.CompressionResult) -> dict[str, jlcm_onnx.TensorRecord]:
    records = {}
    for record in result.report.tensors:
        assert record.name not in records, f"two records for {record.name}"
        records[record.name] = record
    return records


def tolerance(dtype: np.dtype) -> dict[str, float]:
    return {"rtol": 2e-3, "atol": 2e-3} if dtype == np.float16 else {"rtol": 1e-5, "atol": 1e-5}


def compress_and_check(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    config: CompressionConfig,
    weights: list[Weight],
    exact: bool = False,
) -> jlcm_onnx.CompressionResult:
    """Compresses ``model`` and checks the records, validity, and outputs of the result (see the module docstring)."""
    result = jlcm_onnx.compress(model, config)
    records = records_by_name(result)
    reference = model
    for weight in weights:
        record = records[weight.name]
        assert record.status == "compressed", record
        assert record.bits == config.bits
        rows = weight.array.shape[weight.row_axis]
        assert record.groups == expected_groups(rows, weight.array.size // rows, config)
        assert record.shape == weight.array.shape
        assert record.original_bytes == weight.array.nbytes
        assert 0 < record.compressed_bytes
        assert not contains_array(result.model, weight.array), f"dense {weight.name} is still stored"
        row_decoded = record.decode_gate.startswith("row decoder")  # embedding tables keep no outliers
        decoded = dequantized(weight.array, weight.row_axis, config, outliers=not row_decoded)
        expected_sqnr = sqnr_db(weight.array.astype(np.float32), decoded.astype(np.float32))
        if exact:
            np.testing.assert_array_equal(decoded, weight.array)
            assert math.isinf(record.sqnr_db)
        else:
            # (within 0.01 dB: for a float16 weight with float32 codebooks the report measures the float32 values)
            assert record.sqnr_db == pytest.approx(expected_sqnr, abs=0.01)
        reference = replace_initializer(reference, weight.name, decoded)
    check_full(result.model)
    got = run(result.model, feeds)
    want = run(model if exact else reference, feeds)
    assert len(got) == len(want)
    for out, ref in zip(got, want, strict=True):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        if exact and ref.dtype != np.float16:
            np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(out, ref, **tolerance(ref.dtype))
    return result


# --------------------------------------------------------------------------------------------------------- builders


def gemm_model(weight: np.ndarray, trans_b: int, bias: np.ndarray | None = None) -> onnx.ModelProto:
    out_dim, in_dim = weight.shape if trans_b else weight.shape[::-1]
    inputs = ["X", "B"] + (["C"] if bias is not None else [])
    initializers = [tensor("B", weight)] + ([tensor("C", bias)] if bias is not None else [])
    return make_model(
        [helper.make_node("Gemm", inputs, ["Y"], transB=trans_b, alpha=0.5, name="gemm")],
        [value("X", FLOAT, ["N", in_dim])],
        [value("Y", FLOAT, ["N", out_dim])],
        initializers,
    )


def conv_model(weight: np.ndarray, group: int, bias: np.ndarray) -> onnx.ModelProto:
    out_channels, per_group, _, _ = weight.shape
    return make_model(
        [helper.make_node("Conv", ["X", "W", "Bias"], ["Y"], group=group, pads=[1, 1, 1, 1], name="conv")],
        [value("X", FLOAT, [1, per_group * group, 9, 9])],
        [value("Y", FLOAT, [1, out_channels, 9, 9])],
        [tensor("W", weight), tensor("Bias", bias)],
    )


def conv_transpose_model(weight: np.ndarray, group: int) -> onnx.ModelProto:
    in_channels, per_group, k, _ = weight.shape
    return make_model(
        [helper.make_node("ConvTranspose", ["X", "W"], ["Y"], group=group, strides=[2, 2], name="deconv")],
        [value("X", FLOAT, [1, in_channels, 5, 5])],
        [value("Y", FLOAT, [1, per_group * group, None, None])],
        [tensor("W", weight)],
    )


def gather_model(table: np.ndarray, axis: int = 0, ids_shape: list[int | str] | None = None) -> onnx.ModelProto:
    ids_shape = ["A", "B"] if ids_shape is None else ids_shape
    dtype = helper.np_dtype_to_tensor_dtype(table.dtype)
    out_shape = [*ids_shape, table.shape[1]] if axis == 0 else [table.shape[0], *ids_shape]
    return make_model(
        [helper.make_node("Gather", ["table", "ids"], ["Y"], axis=axis, name="embed")],
        [value("ids", INT64, ids_shape)],
        [value("Y", dtype, out_shape)],
        [tensor("table", table)],
    )


def randn(rng: np.random.Generator, *shape: int, dtype: type = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------------------------------------- kinds


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_matmul(rng: np.random.Generator, bits: int, exact: bool) -> None:
    weight = discrete_weight((40, 24), 1, bits, rng) if exact else randn(rng, 40, 24)
    config = CompressionConfig(bits=bits, min_elements=64)
    result = compress_and_check(
        matmul_model(weight), {"X": randn(rng, 3, 40)}, config, [Weight("W", weight, 1)], exact=exact
    )
    (record,) = result.report.tensors
    assert record.consumers == ("MatMul:matmul",)
    assert record.dtype == "FLOAT"


def test_matmul_batched_weight(rng: np.random.Generator) -> None:
    """A rank-3 MatMul B [batch, in, out]: rows are the last axis."""
    weight = randn(rng, 3, 16, 8)
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [value("X", FLOAT, [3, 5, 16])],
        [value("Y", FLOAT, [3, 5, 8])],
        [tensor("W", weight)],
    )
    compress_and_check(model, {"X": randn(rng, 3, 5, 16)}, CompressionConfig(bits=3, min_elements=64),
                       [Weight("W", weight, 2)])


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(rng: np.random.Generator, trans_b: int, exact: bool) -> None:
    shape, row_axis = ((24, 40), 0) if trans_b else ((40, 24), 1)
    weight = discrete_weight(shape, row_axis, 3, rng) if exact else randn(rng, *shape)
    bias = randn(rng, 24)
    config = CompressionConfig(bits=3, min_elements=64)
    result = compress_and_check(
        gemm_model(weight, trans_b, bias), {"X": randn(rng, 4, 40)}, config, [Weight("B", weight, row_axis)],
        exact=exact,
    )
    records = records_by_name(result)
    assert records["C"].status == "skipped" and records["C"].reason
    assert contains_array(result.model, bias)


@pytest.mark.parametrize("exact", [False, True])
def test_grouped_conv(rng: np.random.Generator, exact: bool) -> None:
    shape = (8, 3, 3, 3)  # 8 output channels, group=2 over 6 input channels
    weight = discrete_weight(shape, 0, 2, rng) if exact else randn(rng, *shape)
    bias = randn(rng, 8)
    result = compress_and_check(
        conv_model(weight, 2, bias), {"X": randn(rng, 1, 6, 9, 9)}, CompressionConfig(bits=2, min_elements=100),
        [Weight("W", weight, 0)], exact=exact,
    )
    records = records_by_name(result)
    assert records["Bias"].status == "skipped"
    assert "min_elements" in records["Bias"].reason or "not a weight" in records["Bias"].reason


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(rng: np.random.Generator, group: int, exact: bool) -> None:
    shape = (4, 6, 3, 3)  # 4 input channels; 6 * group output channels
    weight = discrete_weight(shape, 1, 3, rng) if exact else randn(rng, *shape)
    compress_and_check(
        conv_transpose_model(weight, group), {"X": randn(rng, 1, 4, 5, 5)}, CompressionConfig(bits=3, min_elements=100),
        [Weight("W", weight, 1)], exact=exact,
    )


@pytest.mark.parametrize("exact", [False, True])
def test_gather_embedding(rng: np.random.Generator, exact: bool) -> None:
    table = discrete_weight((50, 16), 0, 4, rng) if exact else randn(rng, 50, 12)  # 12 < 16: rows pooled
    ids = np.array([[0, 49, 7], [3, -1, -50]], dtype=np.int64)  # negative ids count from the end
    result = compress_and_check(
        gather_model(table), {"ids": ids}, CompressionConfig(bits=4, min_elements=64), [Weight("table", table, 0)],
        exact=exact,
    )
    (y,) = run(result.model, {"ids": ids})
    assert y.shape == (2, 3, table.shape[1])


def test_gather_scalar_and_1d_ids(rng: np.random.Generator) -> None:
    table = discrete_weight((30, 10), 0, 2, rng)
    config = CompressionConfig(bits=2, min_elements=64)
    for ids_shape, ids in (([], np.array(4, dtype=np.int64)), (["K"], np.array([1, 1, 29], dtype=np.int64))):
        model = gather_model(table, ids_shape=ids_shape)
        result = compress_and_check(model, {"ids": ids}, config, [Weight("table", table, 0)], exact=True)
        (y,) = run(result.model, {"ids": ids})
        np.testing.assert_array_equal(y, table[ids])


def test_gather_along_axis_1(rng: np.random.Generator) -> None:
    table = randn(rng, 12, 40)
    ids = np.array([[0, 39], [5, 6]], dtype=np.int64)
    compress_and_check(gather_model(table, axis=1), {"ids": ids}, CompressionConfig(bits=3, min_elements=64),
                       [Weight("table", table, 1)])


# ------------------------------------------------------------------------------------------------------ tied weights


def uint8_payloads(model: onnx.ModelProto, at_least: int) -> list[onnx.TensorProto]:
    """uint8 initializers of at least ``at_least`` bytes: the packed codes (decoder constants are tiny)."""
    return [
        t for t in all_initializers(model)
        if t.data_type == TensorProto.UINT8 and numpy_helper.to_array(t).nbytes >= at_least
    ]


def test_tied_gather_and_transposed_matmul(rng: np.random.Generator) -> None:
    """Tied embeddings: one table read by a Gather and (through a Transpose) by the output MatMul, stored once."""
    table = randn(rng, 64, 32)
    model = make_model(
        [
            helper.make_node("Gather", ["E", "ids"], ["H"], name="embed"),
            helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="tied"),
            helper.make_node("MatMul", ["H", "Et"], ["logits"], name="lm_head"),
        ],
        [value("ids", INT64, ["N"])],
        [value("logits", FLOAT, ["N", 64]), value("H", FLOAT, ["N", 32])],
        [tensor("E", table)],
    )
    config = CompressionConfig(bits=4, min_elements=64)
    ids = np.array([0, 5, 63, 17], dtype=np.int64)
    result = compress_and_check(model, {"ids": ids}, config, [Weight("E", table, 0)])
    record = records_by_name(result)["E"]
    assert len(record.consumers) == 2
    packed = WordLayout(4).packed_bytes(table.size)
    assert len(uint8_payloads(result.model, packed // 2)) == 1
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in all_initializers(result.model)
                      if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16))
    outlier_bytes = round(config.outlier_fraction * table.size) * 2
    assert float_bytes <= 64 * 16 * 2 + outlier_bytes  # one set of row codebooks and the outliers, nothing dense
    assert record.compressed_bytes < table.nbytes / 2


def test_tied_two_matmuls(rng: np.random.Generator) -> None:
    weight = randn(rng, 32, 32)
    model = make_model(
        [
            helper.make_node("MatMul", ["X", "W"], ["H"], name="first"),
            helper.make_node("Relu", ["H"], ["R"]),
            helper.make_node("MatMul", ["R", "W"], ["Y"], name="second"),
        ],
        [value("X", FLOAT, ["N", 32])],
        [value("Y", FLOAT, ["N", 32])],
        [tensor("W", weight)],
    )
    config = CompressionConfig(bits=3, min_elements=64)
    result = compress_and_check(model, {"X": randn(rng, 2, 32)}, config, [Weight("W", weight, 1)])
    assert records_by_name(result)["W"].consumers == ("MatMul:first", "MatMul:second")
    assert len(uint8_payloads(result.model, WordLayout(3).packed_bytes(weight.size) // 2)) == 1
    assert len(result.report.compressed) == 1


# ---------------------------------------------------------------------------------------------- Constant nodes, If


def test_weight_in_constant_node(rng: np.random.Generator) -> None:
    weight = randn(rng, 24, 16)
    model = make_model(
        [
            helper.make_node("Constant", [], ["W"], value=tensor("W", weight), name="const_w"),
            helper.make_node("MatMul", ["X", "W"], ["Y"], name="matmul"),
        ],
        [value("X", FLOAT, ["N", 24])],
        [value("Y", FLOAT, ["N", 16])],
    )
    result = compress_and_check(model, {"X": randn(rng, 3, 24)}, CompressionConfig(bits=4, min_elements=64),
                                [Weight("W", weight, 1)])
    assert not any(n.op_type == "Constant" and n.output[0] == "W" for n in result.model.graph.node)


def if_model(then_weight: np.ndarray, else_weight: np.ndarray, outer: str | None, main_weight: np.ndarray | None = None
             ) -> onnx.ModelProto:
    """``If(C, H @ Wt, H @ We)``: Wt is a Constant of the then body, We an initializer of the else body.

    ``outer``: None (no main-graph weight: ``H = X``, ``Y = If(...)``); "before" (``H = X @ Wm``, Wm a main-graph
    initializer); "after" (``H = X``, ``Y = If(...) @ Wm``, Wm a main-graph Constant node after the If).
    """
    rows, cols = then_weight.shape
    then_body = helper.make_graph(
        [helper.make_node("Constant", [], ["Wt"], value=tensor("Wt", then_weight)),
         helper.make_node("MatMul", ["H", "Wt"], ["yt"], name="then_matmul")],
        "then_body", [], [value("yt", FLOAT, ["N", cols])],
    )
    else_body = helper.make_graph(
        [helper.make_node("MatMul", ["H", "We"], ["ye"], name="else_matmul")],
        "else_body", [], [value("ye", FLOAT, ["N", cols])], [tensor("We", else_weight)],
    )
    if_output = "Z" if outer == "after" else "Y"
    nodes = [helper.make_node("If", ["C"], [if_output], then_branch=then_body, else_branch=else_body, name="if")]
    initializers = []
    if outer == "before":
        nodes.insert(0, helper.make_node("MatMul", ["X", "Wm"], ["H"], name="outer_matmul"))
        initializers.append(tensor("Wm", main_weight))
    else:
        nodes.insert(0, helper.make_node("Identity", ["X"], ["H"]))
    if outer == "after":
        nodes.append(helper.make_node("Constant", [], ["Wm"], value=tensor("Wm", main_weight)))
        nodes.append(helper.make_node("MatMul", ["Z", "Wm"], ["Y"], name="outer_matmul"))
    out_cols = main_weight.shape[1] if outer == "after" else cols
    return make_model(
        nodes, [value("X", FLOAT, ["N", rows]), value("C", TensorProto.BOOL, [])],
        [value("Y", FLOAT, ["N", out_cols])], initializers,
    )


@pytest.mark.parametrize("condition", [True, False])
def test_weights_inside_if_branches(rng: np.random.Generator, condition: bool) -> None:
    then_weight, else_weight = randn(rng, 16, 8), randn(rng, 16, 8)
    feeds = {"X": randn(rng, 3, 16), "C": np.array(condition)}
    compress_and_check(
        if_model(then_weight, else_weight, None), feeds, CompressionConfig(bits=3, min_elements=64),
        [Weight("Wt", then_weight, 1), Weight("We", else_weight, 1)],
    )


@pytest.mark.parametrize("condition", [True, False])
@pytest.mark.parametrize("outer", ["before", "after"])
def test_weights_inside_if_branches_and_main_graph(rng: np.random.Generator, outer: str, condition: bool) -> None:
    """The same If bodies when the main graph has a compressed weight of its own (edited in the same pass): an
    initializer read before the If, or a Constant node read after it."""
    then_weight, else_weight = randn(rng, 16, 8), randn(rng, 16, 8)
    main_weight = randn(rng, 16, 16) if outer == "before" else randn(rng, 8, 12)
    feeds = {"X": randn(rng, 3, 16), "C": np.array(condition)}
    compress_and_check(
        if_model(then_weight, else_weight, outer, main_weight), feeds, CompressionConfig(bits=3, min_elements=64),
        [Weight("Wm", main_weight, 1), Weight("Wt", then_weight, 1), Weight("We", else_weight, 1)],
    )


@pytest.mark.parametrize("condition", [True, False])
@pytest.mark.parametrize("also_in_main", [True, False])
def test_outer_scope_weight_read_inside_an_if_body_is_compressed(
    rng: np.random.Generator, also_in_main: bool, condition: bool
) -> None:
    """A main-graph weight read from inside an If body (and, or not, by a main-graph MatMul) is decoded in the main
    graph before the If, and the body reads the decoded tensor by its name."""
    weight = randn(rng, 16, 8)
    then_body = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["yt"])], "then_body", [],
                                  [value("yt", FLOAT, ["N", 8])])
    else_body = helper.make_graph([helper.make_node("Neg", ["Y0"], ["ye"])], "else_body", [],
                                  [value("ye", FLOAT, ["N", 8])])
    main = (helper.make_node("MatMul", ["X", "W"], ["Y0"]) if also_in_main
            else helper.make_node("Slice", ["X", "start", "stop", "axis"], ["Y0"]))
    model = make_model(
        [main, helper.make_node("If", ["C"], ["Y"], then_branch=then_body, else_branch=else_body)],
        [value("X", FLOAT, ["N", 16]), value("C", TensorProto.BOOL, [])], [value("Y", FLOAT, ["N", 8])],
        [tensor("W", weight), *(numpy_helper.from_array(np.array([v], np.int64), name)
                                for name, v in (("start", 0), ("stop", 8), ("axis", 1)))],
    )
    compress_and_check(model, {"X": randn(rng, 2, 16), "C": np.array(condition)},
                       CompressionConfig(bits=3, min_elements=64), [Weight("W", weight, 1)])


def test_outer_scope_weight_read_inside_a_loop_body_is_compressed(rng: np.random.Generator) -> None:
    """``Loop`` three times ``h = h @ W`` with W [16, 16] defined in the main graph."""
    weight = randn(rng, 16, 16) * np.float32(0.25)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["h_in", "W"], ["h_out"])],
        "loop_body",
        [value("i", TensorProto.INT64, []), value("cond_in", TensorProto.BOOL, []), value("h_in", FLOAT, ["N", 16])],
        [value("cond_out", TensorProto.BOOL, []), value("h_out", FLOAT, ["N", 16])],
    )
    model = make_model(
        [helper.make_node("Loop", ["trips", "", "X"], ["Y"], body=body)],
        [value("X", FLOAT, ["N", 16])], [value("Y", FLOAT, ["N", 16])],
        [tensor("W", weight), numpy_helper.from_array(np.array(3, np.int64), "trips")],
    )
    compress_and_check(model, {"X": randn(rng, 2, 16)}, CompressionConfig(bits=3, min_elements=64),
                       [Weight("W", weight, 1)])


def test_weights_inside_a_scan_body_and_read_from_outside_it_are_compressed(rng: np.random.Generator) -> None:
    """``Scan`` over the rows of X: each step computes ``tanh(x_t @ Wi + h @ Wo)``; Wi is an initializer of the body,
    Wo a main-graph weight read from inside it."""
    inner, outer = randn(rng, 16, 16) * np.float32(0.3), randn(rng, 16, 16) * np.float32(0.3)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Wi"], ["a"]), helper.make_node("MatMul", ["h_in", "Wo"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Tanh", ["c"], ["h_out"]),
         helper.make_node("Identity", ["h_out"], ["y_t"])],
        "scan_body", [value("h_in", FLOAT, [1, 16]), value("x_t", FLOAT, [1, 16])],
        [value("h_out", FLOAT, [1, 16]), value("y_t", FLOAT, [1, 16])], [tensor("Wi", inner)],
    )
    model = make_model(
        [helper.make_node("Scan", ["H0", "X"], ["H", "Y"], body=body, num_scan_inputs=1)],
        [value("H0", FLOAT, [1, 16]), value("X", FLOAT, [5, 1, 16])], [value("Y", FLOAT, [5, 1, 16])],
        [tensor("Wo", outer)],
    )
    model.graph.output.insert(0, value("H", FLOAT, [1, 16]))
    feeds = {"H0": randn(rng, 1, 16), "X": randn(rng, 5, 1, 16)}
    compress_and_check(model, feeds, CompressionConfig(bits=3, min_elements=64),
                       [Weight("Wi", inner, 1), Weight("Wo", outer, 1)])


# ------------------------------------------------------------------------------------------------------------ fp16


def fp16_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, list[Weight], dict[str, np.ndarray]]:
    """Embedding (Gather) -> MatMul -> Gemm (transB=1), all float16."""
    table = randn(rng, 40, 16, dtype=np.float16)
    w1 = randn(rng, 16, 24, dtype=np.float16) * np.float16(0.25)
    w2 = randn(rng, 12, 24, dtype=np.float16) * np.float16(0.25)
    model = make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["E"]),
            helper.make_node("MatMul", ["E", "W1"], ["H"]),
            helper.make_node("Gemm", ["H", "W2"], ["Y"], transB=1),
        ],
        [value("ids", INT64, ["N"])],
        [value("Y", FLOAT16, ["N", 12])],
        [tensor("table", table), tensor("W1", w1), tensor("W2", w2)],
    )
    weights = [Weight("table", table, 0), Weight("W1", w1, 1), Weight("W2", w2, 0)]
    return model, weights, {"ids": np.array([0, 39, 5], dtype=np.int64)}


@pytest.mark.parametrize("codebook_dtype", ["float16", "float32"])
def test_fp16_model(rng: np.random.Generator, codebook_dtype: str) -> None:
    model, weights, feeds = fp16_model(rng)
    result = compress_and_check(model, feeds, CompressionConfig(bits=4, min_elements=64, codebook_dtype=codebook_dtype),
                                weights)
    for record in result.report.compressed:
        assert record.dtype == "FLOAT16"
        assert record.original_bytes == np.prod(record.shape) * 2
    (y,) = run(result.model, feeds)
    assert y.dtype == np.float16


def test_fp16_exact(rng: np.random.Generator) -> None:
    weight = discrete_weight((32, 24), 1, 3, rng, dtype=np.float16)
    model = matmul_model(weight)
    result = jlcm_onnx.compress(model, CompressionConfig(bits=3, min_elements=64))
    assert math.isinf(result.report.tensors[0].sqnr_db)
    eye = np.eye(32, dtype=np.float16)
    np.testing.assert_array_equal(run(result.model, {"X": eye})[0], weight)


@pytest.mark.parametrize("scale", [1e5, 1e-8])
def test_float32_weights_outside_float16_range(rng: np.random.Generator, scale: float) -> None:
    """With the default float16 codebooks, a float32 weight whose values lie outside float16's range (overflow to inf
    above 65504, flush to zero below ~6e-8) must not be silently destroyed: either the codebooks keep the values (same
    SQNR as the unit-scale weight) or compress refuses with a JlcmError."""
    unit = randn(rng, 64, 32)
    config = CompressionConfig(bits=4, min_elements=64)
    baseline = jlcm_onnx.compress(matmul_model(unit), config).report.tensors[0].sqnr_db
    weight = unit * np.float32(scale)
    try:
        result = jlcm_onnx.compress(matmul_model(weight), config)
    except jlcm_onnx.JlcmError:
        return
    record = result.report.tensors[0]
    (decoded,) = run(result.model, {"X": np.eye(64, dtype=np.float32)})
    assert np.all(np.isfinite(decoded))
    assert sqnr_db(weight, decoded) > baseline - 1.0, (record.sqnr_db, baseline)


# ---------------------------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("groups", [1, 3, None, 1000])
@pytest.mark.parametrize("rows", [48, 50])
def test_groups_matmul(rng: np.random.Generator, groups: int | None, rows: int) -> None:
    """Codebooks shared by contiguous output rows; 50 rows in 3 groups have unequal sizes (17, 17, 16)."""
    weight = discrete_weight((20, rows), 1, 2, rng, groups=groups)
    config = CompressionConfig(bits=2, groups=groups, min_elements=64, reorder=False)
    result = compress_and_check(matmul_model(weight), {"X": randn(rng, 3, 20)}, config, [Weight("W", weight, 1)],
                                exact=True)
    record = result.report.tensors[0]
    expected_groups = rows if groups is None else min(groups, rows)
    assert record.groups == expected_groups
    # codebook storage grows with the number of groups
    packed = WordLayout(2).packed_bytes(weight.size)
    assert record.compressed_bytes >= packed + expected_groups * 4 * 2


@pytest.mark.parametrize("groups", [1, 3, None])
@pytest.mark.parametrize("kind", ["gemm", "gather", "conv"])
def test_groups_other_kinds(rng: np.random.Generator, groups: int | None, kind: str) -> None:
    config = CompressionConfig(bits=3, groups=groups, min_elements=64, reorder=False)
    if kind == "gemm":
        weight = discrete_weight((10, 20), 0, 3, rng, groups=groups)
        model, feeds, name, axis = gemm_model(weight, 1), {"X": randn(rng, 2, 20)}, "B", 0
    elif kind == "gather":
        weight = discrete_weight((10, 20), 0, 3, rng, groups=groups)
        model, feeds, name, axis = gather_model(weight), {"ids": np.array([[9, 0, 4]], dtype=np.int64)}, "table", 0
    else:
        weight = discrete_weight((7, 2, 3, 3), 0, 3, rng, groups=groups)
        model, feeds, name, axis = conv_model(weight, 1, np.zeros(7, np.float32)), {"X": randn(rng, 1, 2, 9, 9)}, "W", 0
    compress_and_check(model, feeds, config, [Weight(name, weight, axis)], exact=True)


def test_many_unequal_groups(rng: np.random.Generator) -> None:
    """More than 256 groups of unequal sizes: the row-to-group map needs 16 bits."""
    weight = discrete_weight((4, 301), 1, 1, rng, groups=300)
    config = CompressionConfig(bits=1, groups=300, min_elements=64, reorder=False)
    result = compress_and_check(matmul_model(weight), {"X": randn(rng, 2, 4)}, config, [Weight("W", weight, 1)],
                                exact=True)
    np.testing.assert_array_equal(run(result.model, {"X": np.eye(4, dtype=np.float32)})[0], weight)


@pytest.mark.parametrize("groups", [1, 3, None])
def test_groups_random_weights(rng: np.random.Generator, groups: int | None) -> None:
    weight = randn(rng, 20, 50)
    config = CompressionConfig(bits=3, groups=groups, min_elements=64, reorder=False)
    compress_and_check(matmul_model(weight), {"X": randn(rng, 3, 20)}, config, [Weight("W", weight, 1)])


# ------------------------------------------------------------------------------------------------------ all bit widths


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kind", ["matmul", "gemm", "gather"])
def test_every_bit_width_is_exact(rng: np.random.Generator, bits: int, kind: str) -> None:
    """Exact round trip through the ONNX decoder at every b: rows-last (MatMul B), rows-first (Gemm transB=1), and
    the per-row decoder of an embedding Gather."""
    levels = 1 << bits
    inner = max(64, levels) + 1  # every value of a codebook is used; code count not a multiple of the word length
    config = CompressionConfig(bits=bits, min_elements=64)
    if kind == "matmul":
        weight = discrete_weight((inner, 48), 1, bits, rng)
        model, feeds, name, axis = matmul_model(weight), {"X": randn(rng, 3, inner)}, "W", 1
    elif kind == "gemm":
        weight = discrete_weight((24, inner), 0, bits, rng)
        model, feeds, name, axis = gemm_model(weight, 1), {"X": randn(rng, 3, inner)}, "B", 0
    else:
        weight = discrete_weight((24, inner), 0, bits, rng)
        ids = np.array([[0, 23, 11], [5, 5, 17]], dtype=np.int64)
        model, feeds, name, axis = gather_model(weight), {"ids": ids}, "table", 0
    result = compress_and_check(model, feeds, config, [Weight(name, weight, axis)], exact=True)
    if kind == "gather":
        np.testing.assert_array_equal(run(result.model, feeds)[0], weight[feeds["ids"]])


# ------------------------------------------------------------------------------------------- skipped, sizes, filters


def test_small_tensors_and_biases_are_skipped(rng: np.random.Generator) -> None:
    big, small, bias = randn(rng, 64, 32), randn(rng, 32, 4), randn(rng, 32)
    model = make_model(
        [
            helper.make_node("MatMul", ["X", "Wbig"], ["H"]),
            helper.make_node("Add", ["H", "bias"], ["Hb"]),
            helper.make_node("MatMul", ["Hb", "Wsmall"], ["Y"]),
        ],
        [value("X", FLOAT, ["N", 64])],
        [value("Y", FLOAT, ["N", 4])],
        [tensor("Wbig", big), tensor("bias", bias), tensor("Wsmall", small)],
    )
    result = jlcm_onnx.compress(model, CompressionConfig(bits=4, min_elements=1024))
    records = records_by_name(result)
    assert records["Wbig"].status == "compressed"
    assert records["Wsmall"].status == "skipped" and "min_elements" in records["Wsmall"].reason
    assert records["bias"].status == "skipped" and "Add" in records["bias"].reason
    for name in ("Wsmall", "bias"):
        assert records[name].compressed_bytes is None and records[name].bits is None
    assert contains_array(result.model, small) and contains_array(result.model, bias)
    assert not contains_array(result.model, big)
    assert "skipped bias" in result.report.format_table(skipped=True)
    x = randn(rng, 2, 64)
    reference = replace_initializer(model, "Wbig", dequantized(big, 1, CompressionConfig(bits=4)))
    np.testing.assert_allclose(run(result.model, {"X": x})[0], run(reference, {"X": x})[0], rtol=1e-5, atol=1e-5)


def test_non_float_and_graph_output_tensors(rng: np.random.Generator) -> None:
    weight, exported = randn(rng, 32, 32), randn(rng, 32, 32)
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"]), helper.make_node("MatMul", ["X", "Wout"], ["Z"]),
         helper.make_node("Reshape", ["Y", "shape"], ["Yr"])],
        [value("X", FLOAT, ["N", 32])],
        [value("Yr", FLOAT, ["M"]), value("Z", FLOAT, ["N", 32]), value("Wout", FLOAT, [32, 32])],
        [tensor("W", weight), tensor("Wout", exported), tensor("shape", np.array([-1], dtype=np.int64))],
    )
    result = jlcm_onnx.compress(model, CompressionConfig(bits=4, min_elements=64))
    records = records_by_name(result)
    assert "shape" not in records  # not a float tensor
    assert records["W"].status == "compressed"
    assert records["Wout"].status == "skipped" and "graph output" in records["Wout"].reason
    check_full(result.model)
    (_, _, wout) = run(result.model, {"X": randn(rng, 2, 32)})
    np.testing.assert_array_equal(wout, exported)


def test_whole_file_ratio(rng: np.random.Generator) -> None:
    weight = randn(rng, 256, 128)
    model = matmul_model(weight)
    result = jlcm_onnx.compress(model, CompressionConfig(bits=4))  # default min_elements
    (record,) = result.report.tensors
    assert record.status == "compressed"
    assert record.compressed_bytes < record.original_bytes
    # packed codes at exactly 4 bits, 128 float16 codebooks of 16 values, outliers as int32 index + float16 value
    outliers = round(CompressionConfig().outlier_fraction * weight.size)
    assert record.outliers == outliers > 0
    assert record.compressed_bytes == WordLayout(4).packed_bytes(weight.size) + 128 * 16 * 2 + outliers * (4 + 2)
    report = result.report
    assert report.original_file_bytes == model.ByteSize()
    assert report.compressed_file_bytes == result.model.ByteSize()
    assert report.compressed_file_bytes < report.original_file_bytes
    assert report.ratio > 1
    assert report.ratio == pytest.approx(report.original_file_bytes / report.compressed_file_bytes)
    assert report.ratio > 3.5  # 32-bit weights to ~5 bits each, plus a small decoder
    summary = report.to_dict()
    assert summary["compressed_tensors"] == 1 and summary["skipped_tensors"] == 0
    assert summary["compressed_weight_bytes"]["original"] == weight.nbytes


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_record_bytes_match_stored_bytes(rng: np.random.Generator, bits: int) -> None:
    weight = randn(rng, 40, 30)
    config = CompressionConfig(bits=bits, groups=5, min_elements=64, codebook_dtype="float32", reorder=False)
    result = jlcm_onnx.compress(gemm_model(weight, 1), config)  # rows first: 40 rows in 5 groups of 8
    (record,) = result.report.compressed
    outliers = round(config.outlier_fraction * weight.size)
    assert record.compressed_bytes == WordLayout(bits).packed_bytes(weight.size) + 5 * (1 << bits) * 4 + outliers * 8


def test_op_types_include_exclude(rng: np.random.Generator) -> None:
    w1, w2, table = randn(rng, 32, 32), randn(rng, 32, 32), randn(rng, 40, 32)
    model = make_model(
        [helper.make_node("Gather", ["emb", "ids"], ["E"]), helper.make_node("MatMul", ["E", "layer1.w"], ["H"]),
         helper.make_node("Gemm", ["H", "layer2.w"], ["Y"], transB=1)],
        [value("ids", INT64, ["N"])], [value("Y", FLOAT, ["N", 32])],
        [tensor("emb", table), tensor("layer1.w", w1), tensor("layer2.w", w2)],
    )

    def statuses(**changes: object) -> dict[str, str]:
        result = jlcm_onnx.compress(model, CompressionConfig(bits=2, min_elements=64, **changes))
        check_full(result.model)
        return {r.name: r.status for r in result.report.tensors}

    assert statuses() == {"emb": "compressed", "layer1.w": "compressed", "layer2.w": "compressed"}
    assert statuses(op_types=["MatMul"]) == {"emb": "skipped", "layer1.w": "compressed", "layer2.w": "skipped"}
    assert statuses(include=["layer*"]) == {"emb": "skipped", "layer1.w": "compressed", "layer2.w": "compressed"}
    assert statuses(exclude=["*.w"]) == {"emb": "compressed", "layer1.w": "skipped", "layer2.w": "skipped"}


def test_decoder_is_gated_by_run_time_input(rng: np.random.Generator, tmp_path) -> None:
    """The decode of a MatMul weight depends on the layer's input, so onnxruntime cannot fold it to a dense initializer
    (the point of the format: weights stay packed in memory): the graph it optimises at load still decodes."""
    weight = randn(rng, 64, 32)
    result = jlcm_onnx.compress(matmul_model(weight), CompressionConfig(bits=4, min_elements=64))
    assert result.report.tensors[0].decode_gate == "X"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    assert any(node.op_type == "GatherElements" for node in optimized.graph.node)
    floats = [t for t in optimized.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert all(np.prod(t.dims) < weight.size for t in floats)  # no decoded copy of the weight
