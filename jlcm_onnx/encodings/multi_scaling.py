"""Multi-scaling: one codebook shared by all row groups and a scale per group, ``W^[r, j] = s[g(r)] * c[I[r, j]]``.
"""

from __future__ import annotations

import numpy as np
import torch

from jlcm_onnx.encodings.codebook import EncodedMatrix
from jlcm_onnx.encodings.kmeans import fit_codebooks, nearest_codes
from jlcm_onnx.encodings.outliers import select_outliers
from jlcm_onnx.memory_budget import MAX_CHUNK_WEIGHTS, row_chunks


def encode_scaled_matrix(
    matrix: np.ndarray,
    bits: int,
    group_sizes: tuple[int, ...],
    codebook_dtype: np.dtype,
    max_iterations: int = 100,
    importance: np.ndarray | None = None,
    outlier_fraction: float = 0.0,
    refinements: int = 3,
    chunk_weights: int = MAX_CHUNK_WEIGHTS,
    outliers_per_row: bool = False,
) -> EncodedMatrix:
    """Multi-scaling: one codebook ``c`` of ``2**bits`` values shared by all groups and a scale per group,
    ``W^[r, j] = s[g(r)] * c[I[r, j]]``, at ``n*b + 16*(K + G)`` bits (fp16).

    Alternates (``refinements`` times) a k-means of the group-normalised weights ``W / s[g]`` for ``c`` with the
    least-squares scale of each group given its codes, ``s_g = <w, c[I]> / <c[I], c[I]>`` (importance-weighted).
    """
    rows, cols = matrix.shape
    outliers = select_outliers(matrix, outlier_fraction, chunk_weights, outliers_per_row)
    weights = np.ones(matrix.shape) if importance is None else np.array(importance, dtype=np.float64, order="C")
    weights.reshape(-1)[outliers] = 0.0
    values = matrix.astype(np.float64)
    group_of_row = np.repeat(np.arange(len(group_sizes)), group_sizes)
    scales = np.sqrt(_group_sum(weights * values**2, group_of_row) / _group_sum(weights, group_of_row).clip(1e-300))
    scales = np.where(scales > 0, scales, 1.0)
    for _ in range(refinements):
        divisor = np.where(scales > 0, scales, 1.0)  # a scale below the codebook dtype's range rounds to 0
        normalized = values / divisor[group_of_row][:, None]
        fitted = fit_codebooks(normalized.reshape(1, -1), bits, codebook_dtype, weights.reshape(1, -1), max_iterations)
        shared = fitted.values[0].astype(np.float64)
        picked = shared[fitted.codes.reshape(rows, cols)]
        fit = _group_sum(weights * values * picked, group_of_row) / _group_sum(weights * picked**2, group_of_row).clip(
            1e-300)
        scales = np.where(fit > 0, fit, scales).astype(codebook_dtype).astype(np.float64)
    shared_stored = fitted.values[0]
    scales_stored = scales.astype(codebook_dtype)
    codebooks = scales_stored.astype(np.float32)[:, None] * shared_stored.astype(np.float32)[None, :]
    row_books = np.empty((rows, cols), dtype=np.uint8)
    for chunk in row_chunks(rows, cols, chunk_weights):
        row_books[chunk] = torch_nearest(values[chunk], codebooks[group_of_row[chunk]])
    return EncodedMatrix(codebooks=codebooks, codes=row_books, group_sizes=tuple(int(s) for s in group_sizes),
                         outlier_index=outliers, outlier_values=matrix.reshape(-1)[outliers].astype(codebook_dtype),
                         scales=scales_stored, shared_codebook=shared_stored)


def _group_sum(values: np.ndarray, group_of_row: np.ndarray) -> np.ndarray:
    return np.bincount(group_of_row, weights=values.sum(axis=1), minlength=int(group_of_row.max()) + 1)


def torch_nearest(values: np.ndarray, row_codebooks: np.ndarray) -> np.ndarray:
    """Index of the nearest codeword of each row's own sorted codebook: values [rows, cols], [rows, K] -> uint8."""
    books = torch.from_numpy(row_codebooks.astype(np.float64))
    return nearest_codes(torch.from_numpy(values.astype(np.float64)), books).numpy().astype(np.uint8)
