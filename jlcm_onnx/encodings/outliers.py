"""Dense-and-sparse outliers: the weights farthest from their row's mean, in row standard deviations, kept exactly as
(flat index, value) pairs beside an encoding.
"""

from __future__ import annotations

import numpy as np

from jlcm_onnx.memory_budget import MAX_CHUNK_WEIGHTS, row_chunks


def outlier_count(size: int, fraction: float) -> int:
    """How many of ``size`` weights are kept as outliers at ``fraction``: ``round(fraction * size)``."""
    return int(round(fraction * size))


def select_outliers(matrix: np.ndarray, fraction: float, chunk_weights: int = MAX_CHUNK_WEIGHTS) -> np.ndarray:
    """Sorted flat indices of the :func:`outlier_count` weights with the largest ``|w - mean(row)| / std(row)`` (ties
    broken towards the lower index), scored ``chunk_weights`` weights of rows at a time."""
    count = outlier_count(matrix.size, fraction)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    cols = matrix.shape[1]
    best_scores, best_index = np.zeros(0), np.zeros(0, dtype=np.int64)
    for rows in row_chunks(matrix.shape[0], cols, chunk_weights):
        values = matrix[rows].astype(np.float64)
        spread = values.std(axis=1, keepdims=True)
        score = (np.abs(values - values.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1.0)).reshape(-1)
        score, index = _at_least_top(score, np.arange(rows.start * cols, rows.stop * cols, dtype=np.int64), count)
        best_scores, best_index = _at_least_top(np.concatenate([best_scores, score]),
                                                np.concatenate([best_index, index]), count)
    order = np.lexsort((best_index, -best_scores))[:count]
    return np.sort(best_index[order])


def _at_least_top(scores: np.ndarray, index: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The scores (with their indices) at least as large as the ``count``-th largest: the top ``count`` and any ties."""
    if scores.size <= count:
        return scores, index
    keep = scores >= np.partition(scores, scores.size - count)[scores.size - count]
    return scores[keep], index[keep]
