"""Dense-and-sparse outliers: the weights farthest from their row's mean, in row standard deviations, kept exactly as
(flat index, value) pairs beside an encoding: the :func:`outlier_count` farthest of the whole matrix, or, for a table
read by row decoders (which patch each looked-up row with its own outliers), the :func:`outliers_per_row` farthest of
every row.
"""

from __future__ import annotations

import numpy as np

from jlcm_onnx.memory_budget import MAX_CHUNK_WEIGHTS, row_chunks


def outlier_count(size: int, fraction: float) -> int:
    """How many of ``size`` weights are kept as outliers at ``fraction``: ``round(fraction * size)``."""
    return int(round(fraction * size))


def outliers_per_row(cols: int, fraction: float) -> int:
    """How many weights of each row of ``cols`` are kept as outliers when every row keeps as many:
    ``round(fraction * cols)``."""
    return int(round(fraction * cols))


def uniform_outliers(index: np.ndarray, rows: int, cols: int) -> int | None:
    """The number of outliers of every row when all rows have as many (sorted flat ``index`` of a [rows, cols]
    matrix); else None."""
    per_row = np.bincount(index // cols, minlength=rows)
    return int(per_row[0]) if rows and (per_row == per_row[0]).all() else None


def select_outliers(matrix: np.ndarray, fraction: float, chunk_weights: int = MAX_CHUNK_WEIGHTS,
                    per_row: bool = False) -> np.ndarray:
    """Sorted flat indices of the :func:`outlier_count` weights with the largest ``|w - mean(row)| / std(row)`` (ties
    broken towards the lower index), scored ``chunk_weights`` weights of rows at a time; with ``per_row``, the
    :func:`outliers_per_row` largest of each row."""
    cols = matrix.shape[1]
    if per_row:
        return _top_of_each_row(matrix, outliers_per_row(cols, fraction), chunk_weights)
    count = outlier_count(matrix.size, fraction)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    best_scores, best_index = np.zeros(0), np.zeros(0, dtype=np.int64)
    for rows in row_chunks(matrix.shape[0], cols, chunk_weights):
        score = _scores(matrix[rows]).reshape(-1)
        score, index = _at_least_top(score, np.arange(rows.start * cols, rows.stop * cols, dtype=np.int64), count)
        best_scores, best_index = _at_least_top(np.concatenate([best_scores, score]),
                                                np.concatenate([best_index, index]), count)
    order = np.lexsort((best_index, -best_scores))[:count]
    return np.sort(best_index[order])


def _scores(rows: np.ndarray) -> np.ndarray:
    """``|w - mean(row)| / std(row)`` of each weight of ``rows`` (float64)."""
    values = rows.astype(np.float64)
    spread = values.std(axis=1, keepdims=True)
    return np.abs(values - values.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1.0)


def _top_of_each_row(matrix: np.ndarray, count: int, chunk_weights: int) -> np.ndarray:
    """Sorted flat indices of the ``count`` largest scores of each row (ties to the lower column)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    cols = matrix.shape[1]
    picked = []
    for rows in row_chunks(matrix.shape[0], cols, chunk_weights):
        columns = np.sort(np.argsort(-_scores(matrix[rows]), axis=1, kind="stable")[:, :count], axis=1)
        picked.append((columns + np.arange(rows.start, rows.stop)[:, None] * cols).reshape(-1))
    return np.concatenate(picked).astype(np.int64)


def _at_least_top(scores: np.ndarray, index: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The scores (with their indices) at least as large as the ``count``-th largest: the top ``count`` and any ties."""
    if scores.size <= count:
        return scores, index
    keep = scores >= np.partition(scores, scores.size - count)[scores.size - count]
    return scores[keep], index[keep]
