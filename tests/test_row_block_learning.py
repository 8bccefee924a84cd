"""A tensor too large to learn at once is learned a block of row groups at a time: the same problem split exactly,
never worse than its start, and the same as learning at once for a tensor under the block size."""

from __future__ import annotations

import numpy as np
import pytest

from jlcm_onnx.encodings import row_block_learning
from jlcm_onnx.encodings.codebook import EncodedMatrix, encode_matrix, equal_group_sizes
from jlcm_onnx.encodings.learning import layer_objective, learn_layer
from jlcm_onnx.encodings.row_block_learning import learn_in_row_blocks
from tests.conftest import correlated_inputs


@pytest.fixture
def layer(rng: np.random.Generator) -> tuple[np.ndarray, EncodedMatrix, np.ndarray]:
    matrix = rng.normal(size=(64, 48)).astype(np.float32)
    inputs = correlated_inputs(256, 48, seed=1)
    encoded = encode_matrix(matrix, 3, equal_group_sizes(64, 8), np.float16, 10, outlier_fraction=0.01)
    return matrix, encoded, inputs.T @ inputs


def test_row_blocks_stack_back_to_the_whole(layer: tuple[np.ndarray, EncodedMatrix, np.ndarray]) -> None:
    _, encoded, _ = layer
    bounds = encoded.block_boundaries(64 * 48 // 3)
    stacked = EncodedMatrix.stacked([encoded.row_block(a, b) for a, b in zip(bounds, bounds[1:], strict=False)])
    assert len(bounds) > 2
    np.testing.assert_array_equal(stacked.decode(), encoded.decode())
    assert stacked.group_sizes == encoded.group_sizes
    np.testing.assert_array_equal(stacked.outlier_index, encoded.outlier_index)


def test_a_small_tensor_is_learned_at_once(layer: tuple[np.ndarray, EncodedMatrix, np.ndarray]) -> None:
    matrix, encoded, gram = layer
    whole = learn_layer(matrix, encoded, gram, steps=10)
    blocked = learn_in_row_blocks(matrix, encoded, gram, steps=10)
    np.testing.assert_array_equal(blocked.encoded.codes, whole.encoded.codes)
    np.testing.assert_array_equal(blocked.encoded.codebooks, whole.encoded.codebooks)


def test_blocks_learn_the_same_objective(layer: tuple[np.ndarray, EncodedMatrix, np.ndarray],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Split in 4 blocks: the combined objective is the whole tensor's objective of the stacked result, it is no worse
    than the start, and close to learning at once."""
    matrix, encoded, gram = layer
    monkeypatch.setattr(row_block_learning, "LEARNING_BLOCK_WEIGHTS", matrix.size // 4)
    blocked = learn_in_row_blocks(matrix, encoded, gram, steps=20)
    whole = learn_layer(matrix, encoded, gram, steps=20)
    assert blocked.final_objective == pytest.approx(layer_objective(matrix, blocked.encoded, gram), rel=1e-6)
    assert blocked.initial_objective == pytest.approx(layer_objective(matrix, encoded, gram), rel=1e-6)
    assert blocked.final_objective <= blocked.initial_objective
    assert blocked.final_objective <= 1.05 * whole.final_objective
    assert blocked.encoded.group_sizes == encoded.group_sizes
    assert not np.array_equal(blocked.encoded.codes, encoded.codes)  # it learned something
