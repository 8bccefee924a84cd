"""The scale and offset of every block of B consecutive inputs of a row, shared by the codebook formats with input
blocks (plain and vector codebooks): a block's weights are decoded as ``s * c + m`` from their codewords ``c``.

A fit starts at each block's min/max (``m = min``, ``s = max - min``: normalised weights in [0, 1]) and, for fixed
codewords, refits the pair by weighted least squares (importances ``h``)::

    [sum h c^2, sum h c; sum h c, sum h] [s; m] = [sum h c w; sum h w]
"""

from __future__ import annotations

import numpy as np


def expand_blocks(per_block: np.ndarray, cols: int, block_size: int) -> np.ndarray:
    """A per-block array [rows, ceil(cols / B)] repeated over the columns of each block: [rows, cols]."""
    return np.repeat(per_block, block_size, axis=1)[:, :cols]


def _blocks(values: np.ndarray, block_size: int, fill: float) -> np.ndarray:
    """[rows, cols] -> [rows, ceil(cols / B), B], the last block padded with ``fill``."""
    rows, cols = values.shape
    count = -(-cols // block_size)
    padded = np.full((rows, count * block_size), fill, dtype=np.float64)
    padded[:, :cols] = values
    return padded.reshape(rows, count, block_size)


def min_max_blocks(
    values: np.ndarray, weights: np.ndarray, block_size: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(s, m) = (max - min, min)`` of every block over its weights of non-zero importance (0 and 0 when none)."""
    counted = weights > 0
    low = _blocks(np.where(counted, values, np.inf), block_size, np.inf).min(axis=2)
    high = _blocks(np.where(counted, values, -np.inf), block_size, -np.inf).max(axis=2)
    empty = ~np.isfinite(low)
    offsets = np.where(empty, 0.0, low).astype(dtype)
    scales = np.where(empty, 0.0, high - offsets.astype(np.float64)).astype(dtype)
    return scales, offsets


def least_squares_blocks(
    values: np.ndarray, weights: np.ndarray, picked: np.ndarray, block_size: int,
    scales: np.ndarray, offsets: np.ndarray, dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """The weighted least-squares ``(s, m)`` of every block for its codewords ``picked`` (the normal equations of
    the module docstring); a block whose system is singular, or whose scale would turn negative, keeps its pair."""
    h, c, w = (_blocks(a, block_size, 0.0) for a in (weights, picked, values))
    shc, sh, shcc = (h * c).sum(2), h.sum(2), (h * c * c).sum(2)
    shcw, shw = (h * c * w).sum(2), (h * w).sum(2)
    determinant = shcc * sh - shc**2
    usable = determinant > 1e-12 * np.maximum(shcc * sh, 1e-300)
    safe = np.where(usable, determinant, 1.0)
    fit_scale = (sh * shcw - shc * shw) / safe
    fit_offset = (shcc * shw - shc * shcw) / safe
    usable &= fit_scale >= 0
    return (np.where(usable, fit_scale, scales).astype(dtype), np.where(usable, fit_offset, offsets).astype(dtype))
