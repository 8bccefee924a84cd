"""A large MatMul weight is decoded one column block at a time, in a bounded number of blocks, to the same product; a
table tied to a head is stored once, its embedding read by a row decoder and its head decoded a block of rows at a
time."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.encodings import codebook_formats
from jlcm_onnx.encodings.codebook import encode_matrix, equal_group_sizes

from conftest import (
    FLOAT,
    INT64,
    check_full,
    dequantized,
    make_model,
    matmul_model,
    replace_initializer,
    run,
    tensor,
    value,
)

F16 = np.dtype(np.float16)


@pytest.mark.parametrize(("block_weights", "blocks"), [(1024, 6), (16, codebook_formats.MAX_COLUMN_BLOCKS)])
def test_blocks_are_bounded_in_count_and_decode_the_weight(monkeypatch: pytest.MonkeyPatch, block_weights: int,
                                                            blocks: int) -> None:
    """96 x 64 weights: blocks of 1024 weights give 6 blocks; blocks of 16 would give 384, capped at 16."""
    monkeypatch.setattr(codebook_formats, "BLOCK_WEIGHTS", block_weights)
    matrix = np.random.default_rng(7).standard_normal((96, 64)).astype(np.float32)  # [out, in]
    config = CompressionConfig(bits=4, min_elements=64, reorder=False, outlier_fraction=0.0)
    result = jlcm_onnx.compress(matmul_model(matrix.T.copy()), config)
    (function,) = result.model.functions
    products = [node.output[0] for node in function.node if node.op_type == "MatMul" and node.input[0] == "x0"]
    (concat,) = [node for node in function.node if node.op_type == "Concat" and node.output[0] == function.output[0]]
    assert list(concat.input) == products and len(products) == blocks
    assert result.report.tensors[0].decode_gate == f"blocked MatMul: decoded in {blocks} column blocks, one at a time"
    (decoded,) = run(result.model, {"X": np.eye(64, dtype=np.float32)})
    expected = encode_matrix(matrix, 4, equal_group_sizes(96, None), F16, outlier_fraction=0.0).decode()
    np.testing.assert_allclose(decoded.T, expected, rtol=1e-6, atol=1e-6)


def tied_model(table: np.ndarray) -> onnx.ModelProto:
    """ids -> Gather(E) -> Relu -> MatMul(., Transpose(E)) -> logits, E [V, D] tied."""
    vocabulary, width = table.shape
    return make_model(
        [helper.make_node("Gather", ["E", "ids"], ["H"], name="embed"),
         helper.make_node("Relu", ["H"], ["R"], name="act"),
         helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="tied"),
         helper.make_node("MatMul", ["R", "Et"], ["logits"], name="lm_head")],
        [value("ids", INT64, ["B", "T"])],
        [value("logits", FLOAT, ["B", "T", vocabulary])],
        [tensor("E", table)])


@pytest.mark.parametrize("groups", [None, 8])  # a codebook per row; 8 groups of clustered, re-ordered rows
def test_a_tied_table_is_stored_once_and_its_head_decoded_in_blocks_of_rows(monkeypatch: pytest.MonkeyPatch,
                                                                           groups: int | None) -> None:
    monkeypatch.setattr(codebook_formats, "BLOCK_WEIGHTS", 4096)
    table = np.random.default_rng(8).standard_normal((512, 32)).astype(np.float32)
    model = tied_model(table)
    config = CompressionConfig(bits=4, min_elements=64, groups=groups, outlier_fraction=0.05)
    result = jlcm_onnx.compress(model, config)
    check_full(result.model)
    assert [node.op_type for node in result.model.graph.node] == ["DecodeRows", "Relu", "BlockedMatMul"]
    (head,) = (function for function in result.model.functions if function.name == "BlockedMatMul")
    nodes = head.node
    assert sum(node.op_type == "Range" for node in nodes) == 4 and sum(node.op_type == "MatMul" for node in nodes) == 4
    packed = [t for t in result.model.graph.initializer if t.data_type == TensorProto.UINT8 and len(t.raw_data) > 1000]
    assert len(packed) == 1  # the codes are stored once, read by both decoders
    (record,) = result.report.compressed
    assert record.outliers == 512 * 2  # 5% of 32 columns in every row: the row decoders patch each row's own
    assert "the tied head MatMul:lm_head: decoded in 4 blocks of rows" in record.decode_gate
    ids = np.array([[0, 511, 17, 256], [3, 3, 400, 128]], dtype=np.int64)
    (logits,) = run(result.model, {"ids": ids})
    decoded = dequantized(table, 0, config, outliers_per_row=True)
    (expected,) = run(replace_initializer(model, "E", decoded), {"ids": ids})
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
