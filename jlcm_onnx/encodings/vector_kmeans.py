"""Batched, weighted k-means of d-dimensional vectors, for vector codebooks.

For one group of vectors ``x_i`` in R^d, with an importance ``h_ia >= 0`` for each of their d weights, a codebook
``c_0 .. c_{K-1}`` minimises::

    D(c) = sum_i min_k sum_a h_ia (x_ia - c_ka)^2

Assignment: every vector's weighted distance to every codeword, ``sum_a h_ia x_ia^2 - 2 sum_a (h_ia x_ia) c_ka +
sum_a h_ia c_ka^2`` (two batched products), a chunk of vectors at a time. Update: each coordinate of a codeword is the
weighted mean of that coordinate over its cell, ``c_ka = sum_{i in k} h_ia x_ia / sum_{i in k} h_ia`` (a coordinate
with no weight in its cell keeps its value).

Start: the product of the d coordinates' scalar k-means codebooks of ``L = K^(1/d)`` levels each
(:mod:`jlcm_onnx.encodings.kmeans`): the scalar quantiser of the group, which Lloyd can only improve. Deterministic.
Lloyd stops once at most :data:`SETTLED` of the codes change in an iteration, or after ``max_iterations``. Codes are
assigned last against the codebook rounded to its storage dtype, what the decoder reads.
"""

from __future__ import annotations

import numpy as np
import torch

from jlcm_onnx.encodings.kmeans import SortedGroups, lloyd

#: Distances computed at once (vectors x codewords x groups of a batch): a few MB, so the product stays in cache.
DISTANCE_CHUNK = 1 << 20
#: Lloyd stops once at most this fraction of the codes change in an iteration: on a SmolLM2-135M MLP weight (1536 x
#: 576, 3 bits, pairs, 54 groups) 2.6x faster than at 0.1%, for a relative weight error of 0.0303 against 0.0298.
SETTLED = 1e-2


def product_grid(values: torch.Tensor, weights: torch.Tensor, entries: int, max_iterations: int) -> torch.Tensor:
    """The product of each coordinate's scalar k-means codebook, [G, K, d], for vectors [G, m, d] (weights alike)."""
    dim = values.shape[2]
    levels = round(entries ** (1.0 / dim))
    per_axis = [lloyd(SortedGroups.of(values[:, :, a], weights[:, :, a]), levels, max_iterations) for a in range(dim)]
    index = torch.from_numpy(np.indices((levels,) * dim).reshape(dim, -1))  # [d, K]: the level of each coordinate
    return torch.stack([per_axis[a][:, index[a]] for a in range(dim)], dim=2)


def nearest_vectors(values: torch.Tensor, weights: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The weighted-nearest codeword of every vector, int64 [G, m] (vectors [G, m, d], codebooks [G, K, d]): the
    argmin over k of ``[h, -2 h x] . [c_k^2, c_k]``, one batched product per chunk of vectors."""
    groups, count, _ = values.shape
    features = torch.cat([weights, -2 * weights * values], dim=2)
    books = torch.cat([codebooks * codebooks, codebooks], dim=2).transpose(1, 2).contiguous()
    step = max(1, DISTANCE_CHUNK // max(1, groups * codebooks.shape[1]))
    codes = torch.empty(groups, count, dtype=torch.int64)
    for start in range(0, count, step):
        codes[:, start:start + step] = torch.bmm(features[:, start:start + step], books).argmin(dim=2)
    return codes


def vector_lloyd(values: torch.Tensor, weights: torch.Tensor, entries: int, max_iterations: int,
                 start: torch.Tensor | None = None) -> torch.Tensor:
    """k-means codebooks [G, K, d] (float64) of vectors [G, m, d] with importances alike, from the product grid or
    from ``start`` [G, K, d]; stops once at most :data:`SETTLED` of the codes change in an iteration."""
    codebooks = (product_grid(values, weights, entries, max_iterations) if start is None
                 else start.to(torch.float64).clone())
    codes = None
    for _ in range(max_iterations):
        new_codes = nearest_vectors(values, weights, codebooks)
        if codes is not None and int((new_codes != codes).sum()) <= SETTLED * codes.numel():
            break
        codes = new_codes
        cells = codes[:, :, None].expand_as(values)
        mass = torch.zeros_like(codebooks).scatter_add_(1, cells, weights)
        moment = torch.zeros_like(codebooks).scatter_add_(1, cells, weights * values)
        codebooks = torch.where(mass > 0, moment / mass.clamp(min=1e-300), codebooks)
    return codebooks


def fit_vector_codebooks(values: np.ndarray, weights: np.ndarray | None, entries: int, codebook_dtype: np.dtype,
                         max_iterations: int, start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Codebooks [G, K, d] in ``codebook_dtype`` and the codes (int64 [G, m]) of vectors ``values`` [G, m, d] with
    importances ``weights`` alike (None: all 1)."""
    tensor = torch.from_numpy(np.asarray(values, dtype=np.float64))
    importance = torch.ones_like(tensor) if weights is None else torch.from_numpy(np.asarray(weights, np.float64))
    first = None if start is None else torch.from_numpy(np.asarray(start, dtype=np.float64))
    fitted = vector_lloyd(tensor, importance, entries, max_iterations, first)
    rounded = fitted.numpy().astype(codebook_dtype)
    return rounded, nearest_vectors(tensor, importance, torch.from_numpy(rounded.astype(np.float64))).numpy()
