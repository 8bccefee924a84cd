"""Dense-and-sparse outliers: a few huge weights are kept exactly and no longer ruin the codebook of their row."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import pytest

import jlcm_onnx
from jlcm_onnx import CompressionConfig, ConfigError
from jlcm_onnx.encodings.codebook import encode_matrix, equal_group_sizes
from jlcm_onnx.encodings.outliers import select_outliers, uniform_outliers
from jlcm_onnx.encodings.sqnr import sqnr_db

from conftest import matmul_model, run


def heavy_tailed(rng: np.random.Generator, rows: int = 64, cols: int = 256) -> np.ndarray:
    """Gaussian rows with 0.2% of weights 30 standard deviations out, as in real LLM layers."""
    matrix = rng.standard_normal((rows, cols)).astype(np.float32)
    spikes = rng.choice(matrix.size, size=round(0.002 * matrix.size), replace=False)
    matrix.reshape(-1)[spikes] = 30.0 * rng.choice([-1.0, 1.0], size=spikes.size)
    return matrix


def encode(matrix: np.ndarray, fraction: float, groups: int | None = 8):  # noqa: ANN201
    return encode_matrix(matrix, 2, equal_group_sizes(matrix.shape[0], groups), np.dtype(np.float16),
                         outlier_fraction=fraction)


def test_outliers_are_the_largest_deviations() -> None:
    matrix = heavy_tailed(np.random.default_rng(0))
    picked = select_outliers(matrix, 0.002)
    assert picked.size == round(0.002 * matrix.size)
    assert np.all(np.abs(matrix.reshape(-1)[picked]) == 30.0)
    assert select_outliers(matrix, 0.0).size == 0


def test_outliers_per_row_are_each_rows_largest_deviations_in_any_chunks() -> None:
    """A row-packed table keeps as many outliers in every row: its largest deviations, whatever the chunking."""
    matrix = np.random.default_rng(1).standard_normal((64, 100)).astype(np.float32)
    matrix[5, 7] = 40.0
    picked = select_outliers(matrix, 0.03, per_row=True)
    assert uniform_outliers(picked, 64, 100) == 3 and uniform_outliers(select_outliers(matrix, 0.03), 64, 100) is None
    assert 5 * 100 + 7 in picked
    deviations = np.abs(matrix - matrix.mean(axis=1, keepdims=True)) / matrix.std(axis=1, keepdims=True)
    kept = np.zeros(matrix.size, bool)
    kept[picked] = True
    kept = kept.reshape(matrix.shape)
    assert (np.where(kept, deviations, np.inf).min(axis=1) >= np.where(kept, -np.inf, deviations).max(axis=1)).all()
    np.testing.assert_array_equal(select_outliers(matrix, 0.03, chunk_weights=300, per_row=True), picked)


def test_outliers_are_kept_and_improve_the_rest() -> None:
    matrix = heavy_tailed(np.random.default_rng(1))
    plain, sparse = encode(matrix, 0.0), encode(matrix, 0.002)
    decoded = sparse.decode().reshape(-1)
    kept = matrix.reshape(-1)[sparse.outlier_index]
    assert np.array_equal(decoded[sparse.outlier_index], kept.astype(np.float16).astype(np.float32))
    inliers = np.ones(matrix.size, dtype=bool)
    inliers[sparse.outlier_index] = False
    plain_error = np.mean((plain.decode().reshape(-1) - matrix.reshape(-1))[inliers] ** 2)
    sparse_error = np.mean((decoded - matrix.reshape(-1))[inliers] ** 2)
    assert sparse_error < 0.6 * plain_error  # 2 bits, 8 codebooks of 8 rows: measured 0.52x
    assert sqnr_db(matrix, sparse.decode()) > sqnr_db(matrix, plain.decode()) + 5.0  # measured +6.1 dB


@pytest.mark.parametrize("rows_last", [True, False])
def test_onnx_decoder_writes_outliers(rows_last: bool) -> None:
    matrix = heavy_tailed(np.random.default_rng(2), rows=48, cols=64)
    weight = matrix.T.copy() if rows_last else matrix  # MatMul B [in, out]: rows (out) are the last axis
    config = CompressionConfig(bits=3, min_elements=64, outlier_fraction=0.01)
    result = jlcm_onnx.compress(matmul_model(weight), config)
    (record,) = result.report.compressed
    assert record.outliers == round(0.01 * matrix.size)
    eye = np.eye(weight.shape[0], dtype=np.float32)
    (decoded,) = run(result.model, {"X": eye})
    expected = encode_matrix(np.moveaxis(weight, 1, 0), 3, equal_group_sizes(weight.shape[1], None),
                             np.dtype(np.float16), outlier_fraction=0.01).decode().T
    np.testing.assert_array_equal(decoded, expected)
    assert np.sum(np.abs(decoded) == 30.0) == np.sum(np.abs(weight) == 30.0)


@pytest.mark.parametrize("codebook_dtype", ["float16", "float32"])
def test_decoder_looks_up_in_the_codebook_type(codebook_dtype: str) -> None:
    """fp16 codebooks of an fp32 weight are gathered and patched in fp16 (half the decode's transient memory) and
    cast to fp32 once, last; the exact values are checked by the test above."""
    matrix = heavy_tailed(np.random.default_rng(3), rows=48, cols=64)
    config = CompressionConfig(bits=3, min_elements=64, outlier_fraction=0.01, codebook_dtype=codebook_dtype)
    compressed = jlcm_onnx.compress(matmul_model(matrix), config).model
    model = onnx.shape_inference.infer_shapes(onnx.inliner.inline_local_functions(compressed))
    types = {value.name: value.type.tensor_type.elem_type for value in model.graph.value_info}
    looked_up = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(codebook_dtype))
    for op in ("GatherElements", "ScatterElements"):
        (node,) = [n for n in model.graph.node if n.op_type == op]
        assert types[node.output[0]] == looked_up
    casts = [n for n in model.graph.node if n.op_type == "Cast" and types.get(n.input[0]) == looked_up]
    assert len(casts) == (1 if codebook_dtype == "float16" else 0)


@pytest.mark.parametrize("bad", [-0.1, 0.5, True, "0.1"])
def test_bad_outlier_fraction(bad: object) -> None:
    with pytest.raises(ConfigError, match="outlier_fraction"):
        CompressionConfig(outlier_fraction=bad)
