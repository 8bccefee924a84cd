"""Signal-to-quantization-noise ratio of a weight and its encoding, in dB: ``10 log10(sum w^2 / sum (w - w^)^2)``
(infinite when the encoding is exact).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from jlcm_onnx.memory_budget import MAX_CHUNK_WEIGHTS, row_chunks


class RowDecodable(Protocol):
    """An encoding that decodes any range of its rows (:class:`EncodedMatrix`, the affine blocks)."""

    def decode(self, rows: slice = slice(None)) -> np.ndarray: ...


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|W|^2 / |W - W^|^2)`` in dB (inf when exact)."""
    return _decibels(*_signal_and_noise(reference, approximation))


def encoding_sqnr_db(matrix: np.ndarray, encoded: RowDecodable,
                     chunk_weights: int = MAX_CHUNK_WEIGHTS) -> float:
    """:func:`sqnr_db` of ``matrix`` and its encoding, decoded ``chunk_weights`` weights of rows at a time."""
    signal = noise = 0.0
    for rows in row_chunks(matrix.shape[0], matrix.shape[1], chunk_weights):
        chunk_signal, chunk_noise = _signal_and_noise(matrix[rows], encoded.decode(rows))
        signal, noise = signal + chunk_signal, noise + chunk_noise
    return _decibels(signal, noise)


def _signal_and_noise(reference: np.ndarray, approximation: np.ndarray) -> tuple[float, float]:
    reference = reference.astype(np.float64)
    return float(np.sum(reference**2)), float(np.sum((reference - approximation.astype(np.float64)) ** 2))


def _decibels(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)
