"""Codes of 2, 4 and 8 bits looked up a byte at a time: the slot layout, exact decodes in onnxruntime for every
reader, no bit shifts, one product per slot for a MatMul, and the planner's byte count."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.encodings.base import WeightShape
from jlcm_onnx.encodings.codebook import encode_matrix, equal_group_sizes
from jlcm_onnx.encodings.codebook_formats import DECODER_BYTES, MultiCodebook
from jlcm_onnx.encodings.slot_tables import SLOT_MIN_COLS, pack_slots, slot_packed_bytes, slot_ranges, unpack_slots

from conftest import FLOAT, check_full, make_model, matmul_model, run, tensor, value

F16 = np.dtype(np.float16)
ROWS, COLS = 45, 128  # 45 rows: the last slot is short at 2 and 4 bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows", [45, 48])
def test_a_byte_holds_the_codes_of_its_slots_rows(bits: int, rows: int) -> None:
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (rows, 7)).astype(np.uint8)
    packed = pack_slots(codes, bits)
    per_slot = -(-rows // (8 // bits))
    assert packed.shape == (per_slot, 7) and packed.nbytes == slot_packed_bytes(rows, 7, bits)
    for slot, (first, count) in enumerate(slot_ranges(rows, bits)):
        assert first == slot * per_slot
        held = (packed[:count] >> np.uint8(slot * bits)) & np.uint8((1 << bits) - 1)
        np.testing.assert_array_equal(held, codes[first:first + count])
    np.testing.assert_array_equal(unpack_slots(packed, bits, rows), codes)


def reader_model(layout: str, matrix: np.ndarray) -> tuple:
    """A model reading ``matrix`` [rows, cols] in ``layout`` and feeds whose output reveals the decoded weight."""
    rows, cols = matrix.shape
    eye = {"X": np.eye(cols, dtype=np.float32)}
    if layout == "matmul":  # B [in, out], the MatMul its lone reader: one product per slot
        return matmul_model(matrix.T.copy()), eye
    if layout == "shared matmul":  # read by two MatMuls: decoded whole, slots concatenated
        nodes = [helper.make_node("MatMul", ["X", "W"], ["A"]), helper.make_node("MatMul", ["X", "W"], ["B"]),
                 helper.make_node("Add", ["A", "B"], ["Y"])]
        return make_model(nodes, [value("X", FLOAT, ["N", cols])], [value("Y", FLOAT, ["N", rows])],
                          [tensor("W", matrix.T.copy())]), eye
    if layout == "gemm":
        return make_model([helper.make_node("Gemm", ["X", "W"], ["Y"], transB=1)], [value("X", FLOAT, ["N", cols])],
                          [value("Y", FLOAT, ["N", rows])], [tensor("W", matrix)]), eye
    image = np.random.default_rng(0).standard_normal((1, 8, 4, 4)).astype(np.float32)
    return make_model([helper.make_node("Conv", ["X", "W"], ["Y"])], [value("X", FLOAT, [1, 8, 4, 4])],
                      [value("Y", FLOAT, [1, rows, 1, 1])], [tensor("W", matrix.reshape(rows, 8, 4, 4))]), {"X": image}


@pytest.mark.parametrize("layout", ["matmul", "shared matmul", "gemm", "conv"])
@pytest.mark.parametrize(("bits", "block"), [(2, 16), (4, None), (8, 32)])
def test_onnxruntime_decodes_exactly_the_encoding(layout: str, bits: int, block: int | None) -> None:
    """Every reader gets EncodedMatrix.decode(), with outliers in every slot, uneven groups and input blocks."""
    matrix = np.random.default_rng(bits).standard_normal((ROWS, COLS)).astype(np.float32)
    config = CompressionConfig(bits=bits, groups=4, block_size=block, min_elements=64, outlier_fraction=0.02,
                               reorder=False)
    model, feeds = reader_model(layout, matrix)
    result = jlcm_onnx.compress(model, config)
    check_full(result.model)
    expected = encode_matrix(matrix, bits, equal_group_sizes(ROWS, 4), F16, outlier_fraction=0.02,
                             block_size=block).decode()
    (decoded,) = run(result.model, feeds)
    if layout == "conv":
        decoded, expected = decoded.reshape(ROWS), expected @ feeds["X"].reshape(-1)
    else:
        decoded = decoded.T / (2 if layout == "shared matmul" else 1)
    np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "slots"), [(2, 4), (4, 2), (8, 1)])
def test_codes_are_looked_up_without_bit_shifts_and_each_slot_multiplied(bits: int, slots: int) -> None:
    matrix = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
    result = jlcm_onnx.compress(matmul_model(matrix.T.copy()), CompressionConfig(bits=bits, min_elements=64))
    (function,) = result.model.functions
    ops = [node.op_type for node in function.node]
    assert "BitShift" not in ops and ops.count("GatherElements") == slots
    products = [node for node in function.node if node.op_type == "MatMul" and node.input[0] == "x0"]
    assert len(products) == slots  # X @ W^_s^T, never the concatenated weight


@pytest.mark.parametrize(("bits", "cols"), [(3, COLS), (4, SLOT_MIN_COLS - 1)])
def test_other_code_widths_and_short_rows_keep_the_word_layout(bits: int, cols: int) -> None:
    """3-bit codes do not fill bytes; rows shorter than SLOT_MIN_COLS would build more table than they decode."""
    matrix = np.random.default_rng(0).standard_normal((ROWS, cols)).astype(np.float32)
    result = jlcm_onnx.compress(matmul_model(matrix.T.copy()), CompressionConfig(bits=bits, min_elements=64))
    (function,) = result.model.functions
    assert any(node.op_type == "BitShift" for node in function.node)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_planner_counts_the_slot_layout_s_bytes(bits: int) -> None:
    matrix = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
    config = CompressionConfig(bits=bits, groups=5, min_elements=64, codebook_dtype="float32", reorder=False)
    result = jlcm_onnx.compress(matmul_model(matrix.T.copy()), config)
    (record,) = result.report.compressed
    shape = WeightShape("W", ROWS * COLS, ROWS, 4, False, 4, MultiCodebook())
    estimate = MultiCodebook().stored_bytes(shape, bits, 5, config.outlier_fraction, config)
    assert estimate - DECODER_BYTES[bits] - 3 * len("W") == record.compressed_bytes
    assert record.compressed_bytes == slot_packed_bytes(ROWS, COLS, bits) + 5 * (1 << bits) * 4 + record.outliers * 8
