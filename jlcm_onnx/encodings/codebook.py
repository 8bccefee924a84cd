"""Multi-codebook encoding of a weight matrix: ``W^[r, j] = C[g(r), I[r, j]]``.

The matrix ``W`` [rows, cols] has one row per output neuron. Rows are split into G contiguous groups, group g
holding rows ``[start_g, start_g + size_g)``; each group owns a codebook ``C[g]`` of ``K = 2**b`` values and every
weight keeps a b-bit index ``I[r, j]``. Memory cost in bits (docs/method.md, section 2)::

    n * b + bits(codebook dtype) * (G * K + m) + 32 * m          n = rows * cols, m outliers

*Dense-and-sparse* outliers: the m weights farthest from their row's mean (in row standard deviations) are kept as
(flat index, value) pairs, the value in the codebook dtype, written over the decoded matrix, and get zero weight in
the k-means, so a few huge weights no longer drag the outermost codewords away from the bulk of the row.

Groups of equal size are solved together by the batched Lloyd k-means of :mod:`jlcm_onnx.encodings.kmeans`.

*Input blocks* (``block_size = B``): every row is also cut into blocks of B consecutive inputs, and each block gets a
scale and an offset (codebook dtype) on top of its row group's codebook, which then holds normalised values::

    W^[r, j] = s[r, j // B] * C[g(r), I[r, j]] + m[r, j // B]        + 2 * bits(codebook dtype) * rows * ceil(cols / B)

Blocks start at their min/max (``m = min``, ``s = max - min``, so normalised weights lie in [0, 1] and the codebook
starts at the uniform levels ``k / (K - 1)``: round-to-nearest on a grid per block), then alternate ``refinements``
times: Lloyd k-means of the normalised weights ``(w - m) / s`` with importance ``h * s^2`` (the error in weight space),
and the weighted least-squares ``(s, m)`` of each block given its codewords ``c = C[I]``::

    [sum h c^2, sum h c; sum h c, sum h] [s; m] = [sum h c w; sum h w]

Weights that came from blocks of uniform levels (GGUF Q4_1 and the like) are reproduced exactly at those bits, which
per-row codebooks alone cannot do when the scale changes every B inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from jlcm_onnx.encodings.input_blocks import expand_blocks, least_squares_blocks, min_max_blocks
from jlcm_onnx.encodings.kmeans import SortedGroups, fit_codebooks, lloyd, rounded_codebooks
from jlcm_onnx.encodings.outliers import select_outliers
from jlcm_onnx.encodings.vector_kmeans import fit_vector_codebooks
from jlcm_onnx.memory_budget import MAX_CHUNK_WEIGHTS, RowChunk, group_chunks, row_chunks


@dataclass(frozen=True)
class EncodedMatrix:
    """``codebooks`` [G, K], ``codes`` uint8 [rows, cols], ``group_sizes`` [G] (rows per group, in order), and the
    outliers: sorted flat indices into [rows, cols] (int64 [m]) with their exact values (codebook dtype [m]).

    With ``vector_dim`` d > 1 (vector codebooks, :mod:`jlcm_onnx.encodings.vector_codebook`) every d consecutive
    inputs of a row share one code: ``codebooks`` [G, K, d] with ``K = 2^(b d)``, ``codes`` [rows, cols / d]."""

    codebooks: np.ndarray
    codes: np.ndarray
    group_sizes: tuple[int, ...]
    outlier_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    outlier_values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float16))
    scales: np.ndarray | None = None
    shared_codebook: np.ndarray | None = None
    block_size: int | None = None
    block_scales: np.ndarray | None = None
    block_offsets: np.ndarray | None = None
    vector_dim: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        """The encoded matrix's [rows, cols]."""
        rows, codes_per_row = self.codes.shape
        return rows, codes_per_row * self.vector_dim

    @property
    def blocked(self) -> bool:
        """True when input blocks carry a scale and an offset (``block_scales`` and ``block_offsets`` [rows,
        ceil(cols / block_size)], codebook dtype)."""
        return self.block_size is not None

    def block_affine(self, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Scale and offset of every weight of ``rows`` [rows, cols] (float64; ones and zeros without input
        blocks)."""
        count, cols = len(range(*rows.indices(self.codes.shape[0]))), self.shape[1]
        if self.block_size is None:
            return np.ones((count, cols)), np.zeros((count, cols))
        return tuple(expand_blocks(a[rows].astype(np.float64), cols, self.block_size)
                     for a in (self.block_scales, self.block_offsets))

    @property
    def multi_scaling(self) -> bool:
        """True when ``codebooks[g] = scales[g] * shared_codebook`` (stored as G scales and one codebook)."""
        return self.scales is not None

    @property
    def index_bits(self) -> int:
        """Bits of one code (``b d`` for vector codebooks)."""
        return int(math.log2(self.codebooks.shape[1]))

    @property
    def bits(self) -> int:
        """Bits per weight of the codes."""
        return self.index_bits // self.vector_dim

    def row_codebooks(self) -> np.ndarray:
        """The codebook of every row [rows, K] ([rows, K, d] for vector codebooks)."""
        return np.repeat(self.codebooks, self.group_sizes, axis=0)

    def row_block(self, start: int, stop: int) -> EncodedMatrix:
        """The encoding of rows ``[start, stop)``; both must be group boundaries."""
        bounds = np.concatenate([[0], np.cumsum(self.group_sizes)])
        first, last = np.searchsorted(bounds, [start, stop])
        if bounds[first] != start or bounds[min(last, len(bounds) - 1)] != stop:
            raise ValueError(f"rows [{start}, {stop}) do not start and end at group boundaries")
        cols = self.shape[1]
        keep = (self.outlier_index >= start * cols) & (self.outlier_index < stop * cols)
        blocks = {} if self.block_size is None else dict(
            block_size=self.block_size, block_scales=self.block_scales[start:stop],
            block_offsets=self.block_offsets[start:stop])
        return EncodedMatrix(self.codebooks[first:last], self.codes[start:stop], self.group_sizes[first:last],
                             self.outlier_index[keep] - start * cols, self.outlier_values[keep],
                             None if self.scales is None else self.scales[first:last], self.shared_codebook, **blocks,
                             vector_dim=self.vector_dim)

    @classmethod
    def stacked(cls, blocks: list[EncodedMatrix]) -> EncodedMatrix:
        """The encoding of ``blocks`` (consecutive row blocks of one matrix, as :meth:`row_block` cuts them) one
        under the other."""
        first = blocks[0]
        cols = first.shape[1]
        starts = np.cumsum([0, *(block.codes.shape[0] for block in blocks)])[:-1]
        affine = {} if first.block_size is None else dict(
            block_size=first.block_size, block_scales=np.concatenate([b.block_scales for b in blocks]),
            block_offsets=np.concatenate([b.block_offsets for b in blocks]))
        return cls(
            np.concatenate([b.codebooks for b in blocks]), np.concatenate([b.codes for b in blocks]),
            tuple(size for b in blocks for size in b.group_sizes),
            np.concatenate([b.outlier_index + start * cols for b, start in zip(blocks, starts, strict=True)]),
            np.concatenate([b.outlier_values for b in blocks]),
            None if first.scales is None else np.concatenate([b.scales for b in blocks]), first.shared_codebook,
            **affine, vector_dim=first.vector_dim,
        )

    def block_boundaries(self, max_weights: int) -> list[int]:
        """Group-aligned row boundaries cutting the matrix into blocks of about ``max_weights`` weights or fewer."""
        rows, cols = self.shape
        blocks = -(-rows * cols // max_weights)
        group_starts = np.concatenate([[0], np.cumsum(self.group_sizes)])
        targets = np.linspace(0, rows, blocks + 1)
        above = np.searchsorted(group_starts, targets).clip(1, len(group_starts) - 1)
        below = above - 1  # the nearest group start of each target, ties to the lower one
        nearer_above = np.abs(group_starts[above] - targets) < np.abs(group_starts[below] - targets)
        picked = group_starts[np.where(nearer_above, above, below)]
        return sorted({int(b) for b in picked} | {0, rows})

    def decode(self, rows: slice = slice(None)) -> np.ndarray:
        """``W^`` [rows, cols] in float32 (of ``rows`` only, when given), a chunk of rows at a time (the codes are
        widened to indices chunk by chunk, never whole)."""
        start, stop, _ = rows.indices(self.codes.shape[0])
        cols = self.shape[1]
        decoded = np.empty((stop - start, cols), np.float32)
        books = np.repeat(self.codebooks.astype(np.float32), self.group_sizes, axis=0)[start:stop]
        for chunk in row_chunks(stop - start, cols, MAX_CHUNK_WEIGHTS):
            decoded[chunk] = self._decode_rows(start + chunk.start, start + chunk.stop, books[chunk])
        return decoded

    def _decode_rows(self, start: int, stop: int, books: np.ndarray) -> np.ndarray:
        """Rows ``start:stop`` of ``W^``, given their codebooks row by row (``books``)."""
        cols = self.shape[1]
        codes = self.codes[start:stop].astype(np.intp)
        if self.vector_dim == 1:
            decoded = np.take_along_axis(books, codes, axis=1)
        else:  # books [n, K, d], codes [n, cols / d] -> [n, cols / d, d]
            decoded = books[np.arange(stop - start)[:, None], codes].reshape(stop - start, cols)
        if self.block_size is not None:
            scale, offset = self.block_affine(slice(start, stop))
            decoded = (decoded * scale.astype(np.float32) + offset.astype(np.float32)).astype(np.float32)
        first, last = np.searchsorted(self.outlier_index, [start * cols, stop * cols])
        decoded.reshape(-1)[self.outlier_index[first:last] - start * cols] = self.outlier_values[first:last]
        return decoded


def equal_group_sizes(rows: int, groups: int | None) -> tuple[int, ...]:
    """Sizes of ``groups`` contiguous row ranges as equal as possible (None: one row per group)."""
    count = rows if groups is None else min(groups, rows)
    base, extra = divmod(rows, count)
    return tuple([base + 1] * extra + [base] * (count - extra))


def encode_matrix(
    matrix: np.ndarray,
    bits: int,
    group_sizes: tuple[int, ...],
    codebook_dtype: np.dtype,
    max_iterations: int = 100,
    importance: np.ndarray | None = None,
    outlier_fraction: float = 0.0,
    block_size: int | None = None,
    refinements: int = 3,
    chunk_weights: int = MAX_CHUNK_WEIGHTS,
    outliers_per_row: bool = False,
    vector_dim: int = 1,
) -> EncodedMatrix:
    """k-means codebooks of ``2**bits`` values for each contiguous row group of ``matrix`` [rows, cols], keeping the
    ``outlier_fraction`` of weights farthest from their row mean aside (as many in every row with
    ``outliers_per_row``), and with ``block_size`` a scale and an offset
    per block of inputs fitted ``refinements`` times (see the module docstring). With ``vector_dim`` d > 1, codebooks
    of ``2**(bits d)`` vectors of d consecutive inputs (:mod:`jlcm_onnx.encodings.vector_kmeans`). Groups are encoded
    a chunk of about ``chunk_weights`` weights at a time (:mod:`jlcm_onnx.memory_budget`); the result does not depend
    on the chunk."""
    rows, cols = matrix.shape
    if sum(group_sizes) != rows:
        raise ValueError(f"group sizes {group_sizes} do not cover {rows} rows")
    if cols % vector_dim:
        raise ValueError(f"{cols} columns do not split into vectors of {vector_dim}")
    sizes = tuple(int(s) for s in group_sizes)
    outliers = select_outliers(matrix, outlier_fraction, chunk_weights, outliers_per_row)
    entries = 1 << (bits * vector_dim)
    codebooks = np.empty((len(sizes), entries) + ((vector_dim,) if vector_dim > 1 else ()), dtype=codebook_dtype)
    codes = np.empty((rows, cols // vector_dim), dtype=np.uint8)
    blocks = {} if block_size is None else dict(
        block_size=block_size, block_scales=np.empty((rows, -(-cols // block_size)), dtype=codebook_dtype),
        block_offsets=np.empty((rows, -(-cols // block_size)), dtype=codebook_dtype))
    for chunk in group_chunks(sizes, cols, chunk_weights):
        weights = _chunk_importance(importance, outliers, chunk, cols)
        chunk_sizes, values = sizes[chunk.groups], matrix[chunk.rows]
        if block_size is None:
            codebooks[chunk.groups], codes[chunk.rows] = _fit_groups(values, weights, chunk_sizes, bits,
                                                                     codebook_dtype, max_iterations,
                                                                     vector_dim=vector_dim)
            continue
        (codebooks[chunk.groups], codes[chunk.rows], blocks["block_scales"][chunk.rows],
         blocks["block_offsets"][chunk.rows]) = _fit_blocked_groups(values, weights, chunk_sizes, bits,
                                                                    codebook_dtype, max_iterations, block_size,
                                                                    refinements, vector_dim)
    return EncodedMatrix(codebooks=codebooks, codes=codes, group_sizes=sizes, outlier_index=outliers,
                         outlier_values=matrix.reshape(-1)[outliers].astype(codebook_dtype), **blocks,
                         vector_dim=vector_dim)


def codebook_errors(
    matrix: np.ndarray,
    bit_widths: Iterable[int],
    group_sizes: tuple[int, ...],
    codebook_dtype: np.dtype,
    max_iterations: int = 100,
    outlier_fraction: float = 0.0,
) -> dict[int, float]:
    """The squared error ``||W - W^||^2`` that :func:`encode_matrix` (no importances, no input blocks) reaches on
    ``matrix`` at each of ``bit_widths``, without building the encodings: each group is sorted once for every width
    (:class:`~jlcm_onnx.encodings.kmeans.SortedGroups`) and the error read off its prefix sums. For small matrices (the
    whole matrix is one batch)."""
    rows, cols = matrix.shape
    outliers = select_outliers(matrix, outlier_fraction)
    weights = np.ones(matrix.size)
    weights[outliers] = 0.0
    kept = matrix.reshape(-1)[outliers]
    outlier_error = float(np.sum((kept.astype(codebook_dtype).astype(np.float64) - kept) ** 2))
    sizes = np.asarray(group_sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    batches = []
    for members in _size_buckets(sizes):
        element = np.concatenate([np.arange(starts[g] * cols, (starts[g] + sizes[g]) * cols) for g in members])
        padded, padded_weights, _ = _padded_groups(matrix.reshape(-1)[element], weights[element], sizes[members] * cols)
        batches.append(SortedGroups.of(torch.from_numpy(padded), torch.from_numpy(padded_weights)))
    def error(bits: int) -> float:
        fitted = (rounded_codebooks(lloyd(batch, 1 << bits, max_iterations), codebook_dtype) for batch in batches)
        return outlier_error + sum(float(batch.squared_errors(books).sum())
                                   for batch, books in zip(batches, fitted, strict=True))

    return {bits: error(bits) for bits in bit_widths}


def _chunk_importance(
    importance: np.ndarray | None, outliers: np.ndarray, chunk: RowChunk, cols: int
) -> np.ndarray | None:
    """The importances of a chunk's weights with its outliers at zero (None when all are 1: no importances and no
    outliers in the chunk)."""
    first, last = np.searchsorted(outliers, [chunk.row_start * cols, chunk.row_stop * cols])
    local = outliers[first:last] - chunk.row_start * cols
    if local.size == 0:
        return importance if importance is None else importance[chunk.rows]
    weights = np.ones((chunk.row_stop - chunk.row_start, cols)) if importance is None else np.array(
        importance[chunk.rows], dtype=np.float64, order="C")  # C order: the flat view below must not be a copy
    weights.reshape(-1)[local] = 0.0
    return weights


def _fit_blocked_groups(
    matrix: np.ndarray, importance: np.ndarray | None, sizes: tuple[int, ...], bits: int, codebook_dtype: np.dtype,
    max_iterations: int, block_size: int, refinements: int, vector_dim: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codebooks, codes, block scales and block offsets of rows in input blocks (see the module docstring)."""
    rows, cols = matrix.shape
    weights = np.ones(matrix.shape) if importance is None else np.array(importance, dtype=np.float64, order="C")
    values = matrix.astype(np.float64)
    scales, offsets = min_max_blocks(values, weights, block_size, codebook_dtype)
    codebooks = np.tile(np.linspace(0.0, 1.0, 1 << bits), (len(sizes), 1)) if vector_dim == 1 else None
    for refinement in range(refinements + 1):
        scale, offset = (expand_blocks(a.astype(np.float64), cols, block_size) for a in (scales, offsets))
        normalized = (values - offset) / np.where(scale > 0, scale, 1.0)
        codebooks, codes = _fit_groups(normalized, weights * scale**2, sizes, bits, codebook_dtype, max_iterations,
                                       None if codebooks is None else codebooks.astype(np.float64), vector_dim)
        if refinement < refinements:
            picked = np.repeat(codebooks.astype(np.float64), sizes, axis=0)[np.arange(rows)[:, None], codes]
            picked = picked.reshape(rows, cols)
            scales, offsets = least_squares_blocks(values, weights, picked, block_size, scales, offsets,
                                                    codebook_dtype)
    return codebooks, codes, scales, offsets


def _fit_groups(
    values: np.ndarray, importance: np.ndarray | None, group_sizes: tuple[int, ...], bits: int,
    codebook_dtype: np.dtype, max_iterations: int, start: np.ndarray | None = None, vector_dim: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Codebooks [G, 2**bits] and uint8 codes [rows, cols] of every contiguous row group of ``values`` (with
    ``vector_dim`` d > 1: [G, 2**(bits d), d] and [rows, cols / d])."""
    rows, cols = values.shape
    per_row = cols // vector_dim
    entries = 1 << (bits * vector_dim)
    codebooks = np.zeros((len(group_sizes), entries) + ((vector_dim,) if vector_dim > 1 else ()), codebook_dtype)
    codes = np.zeros(rows * per_row, dtype=np.uint8)
    sizes = np.asarray(group_sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    vectors = values.reshape(-1, vector_dim)
    weights = None if importance is None else importance.reshape(-1, vector_dim)
    for members in _size_buckets(sizes):
        element = np.concatenate([np.arange(starts[g] * per_row, (starts[g] + sizes[g]) * per_row) for g in members])
        if vector_dim == 1:
            padded, padded_weights, slots = _padded_groups(vectors[element, 0],
                                                           None if weights is None else weights[element, 0],
                                                           sizes[members] * cols)
            fitted = fit_codebooks(padded, bits, codebook_dtype, padded_weights, max_iterations,
                                   None if start is None else start[members])
            codebooks[members], found = fitted.values, fitted.codes
        else:
            slots, width = _group_slots(sizes[members] * per_row)
            padded = np.zeros((len(members) * width, vector_dim))
            padded_weights = np.zeros_like(padded)
            padded[slots] = vectors[element]
            padded_weights[slots] = 1.0 if weights is None else weights[element]
            codebooks[members], found = fit_vector_codebooks(
                padded.reshape(len(members), width, vector_dim), padded_weights.reshape(len(members), width, -1),
                entries, codebook_dtype, max_iterations, None if start is None else start[members])
        codes[element] = found.reshape(-1)[slots]
    return codebooks, codes.reshape(rows, per_row)


def _size_buckets(sizes: np.ndarray) -> list[np.ndarray]:
    """Groups whose sizes share a power of two, so padding them to a common size at most doubles the work."""
    octave = np.floor(np.log2(sizes)).astype(int)
    return [np.flatnonzero(octave == level) for level in np.unique(octave)]


def _group_slots(sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """Consecutive groups of ``sizes`` elements as the rows of a batch [G, width]: the position of every element in
    the flattened batch, and the width (the largest size)."""
    width = int(sizes.max())
    group_of_element = np.repeat(np.arange(len(sizes)), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return group_of_element * width + (np.arange(int(sizes.sum())) - starts[group_of_element]), width


def _padded_groups(
    flat: np.ndarray, importance: np.ndarray | None, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive groups of ``flat`` (``sizes`` elements each) as one k-means batch: values and importances
    [G, max size], padded with zero-importance copies of each group's first value, and ``slots``, the position of every
    element of ``flat`` in the flattened batch."""
    slots, width = _group_slots(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    values = np.repeat(flat[starts].astype(np.float64), width).reshape(len(sizes), width)
    values.reshape(-1)[slots] = flat
    weights = np.zeros((len(sizes), width))
    weights.reshape(-1)[slots] = 1.0 if importance is None else importance
    return values, weights, slots
