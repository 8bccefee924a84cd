"""A large MatMul weight is decoded one column block at a time, in a bounded number of blocks, to the same product."""

from __future__ import annotations

import numpy as np
import pytest

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.encodings import codebook_formats
from jlcm_onnx.encodings.codebook import encode_matrix, equal_group_sizes

from conftest import matmul_model, run

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
    assert sum(node.op_type == "MatMul" for node in function.node) == blocks
    assert result.report.tensors[0].decode_gate == f"blocked MatMul: decoded in {blocks} column blocks, one at a time"
    (decoded,) = run(result.model, {"X": np.eye(64, dtype=np.float32)})
    expected = encode_matrix(matrix, 4, equal_group_sizes(96, None), F16, outlier_fraction=0.0).decode()
    np.testing.assert_allclose(decoded.T, expected, rtol=1e-6, atol=1e-6)
