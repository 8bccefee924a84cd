"""Clustering the output neurons (rows) of a weight into groups that share a codebook.

Rows are described by their distribution: the quantiles ``q_t(row)`` at ``t = (i + 1/2) / Q`` for Q = 16 levels, a
vector that captures both the scale and the shape of the row. Rows are clustered into G groups by k-means on these
descriptors (Lloyd, deterministic farthest-point start, seeded tie-breaks), and a permutation ``P`` sorts the rows by
group so every group is a contiguous range::

    W_grouped = W[P]          group g = rows [start_g, start_g + size_g) of W_grouped

Groups are ordered by their mean row spread and rows keep their original order inside a group, so equal inputs give
equal permutations. The permutation is free at run time only when it can be folded into the graph (see
:mod:`jlcm_onnx.passes.reorder_neurons`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jlcm_onnx.memory_budget import MAX_CHUNK_WEIGHTS, row_chunks

QUANTILE_LEVELS = 16


@dataclass(frozen=True)
class RowGroups:
    """``permutation[i]`` is the original row at position i; ``sizes[g]`` the rows of group g, in order."""

    permutation: np.ndarray
    sizes: tuple[int, ...]


def row_descriptors(matrix: np.ndarray, levels: int = QUANTILE_LEVELS) -> np.ndarray:
    """The quantiles of each row at ``(i + 1/2) / levels``: [rows, levels] (a chunk of rows at a time)."""
    quantiles = (np.arange(levels) + 0.5) / levels
    descriptors = np.empty((matrix.shape[0], levels))
    for rows in row_chunks(*matrix.shape, MAX_CHUNK_WEIGHTS):
        descriptors[rows] = np.quantile(matrix[rows].astype(np.float64), quantiles, axis=1).T
    return descriptors


class RowClusterings:
    """:func:`cluster_rows` of the weights of one model, by weight name and group count, each computed once for all
    the runs over that model (the size planner's option errors, its rehearsals, the real run). A weight's descriptors
    are quantiles of its rows, which permuting its columns (the fold of the previous layer's re-ordering, which may
    differ between runs) leaves unchanged, so its clusterings are the same in every run."""

    def __init__(self) -> None:
        self._descriptors: dict[str, np.ndarray] = {}
        self._clusters: dict[tuple[str, int], RowGroups] = {}

    def cluster(self, name: str, matrix: np.ndarray, groups: int) -> RowGroups:
        """``cluster_rows(matrix, groups)`` of the weight ``name`` (``matrix``: its rows, columns in any order)."""
        if (name, groups) not in self._clusters:
            if name not in self._descriptors:
                self._descriptors[name] = row_descriptors(matrix)
            self._clusters[name, groups] = cluster_descriptors(self._descriptors[name], groups)
        return self._clusters[name, groups]


def cluster_rows(matrix: np.ndarray, groups: int, iterations: int = 50) -> RowGroups:
    """Clusters the rows of ``matrix`` [rows, cols] into at most ``groups`` non-empty groups of similar rows."""
    return cluster_descriptors(row_descriptors(matrix), groups, iterations)


def cluster_descriptors(row_quantiles: np.ndarray, groups: int, iterations: int = 50) -> RowGroups:
    """:func:`cluster_rows` on precomputed :func:`row_descriptors` [rows, levels] (reused across group counts)."""
    rows = row_quantiles.shape[0]
    groups = min(groups, rows)
    descriptors = torch.from_numpy(row_quantiles)
    centers = _farthest_point_start(descriptors, groups)
    labels = _nearest_centers(descriptors, centers)
    for _ in range(iterations):
        counts = torch.bincount(labels, minlength=groups).to(torch.float64)
        sums = torch.zeros_like(centers).index_add_(0, labels, descriptors)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        new_labels = _nearest_centers(descriptors, centers)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    spread = descriptors[:, -1] - descriptors[:, 0]
    used = torch.unique(labels)
    group_spread = torch.stack([spread[labels == g].mean() for g in used])
    rank = torch.empty(groups, dtype=torch.int64)
    rank[used[torch.argsort(group_spread, stable=True)]] = torch.arange(used.numel())
    order = torch.argsort(rank[labels] * rows + torch.arange(rows))
    sizes = torch.bincount(rank[labels], minlength=used.numel())
    return RowGroups(permutation=order.numpy(), sizes=tuple(int(s) for s in sizes))


def _nearest_centers(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The nearest center of every point, a chunk of points at a time (the distances are [points, centers])."""
    step = max(1, MAX_CHUNK_WEIGHTS // max(centers.shape[0], 1))
    return torch.cat([torch.cdist(points[start:start + step], centers).argmin(dim=1)
                      for start in range(0, points.shape[0], step)])


def _farthest_point_start(points: torch.Tensor, count: int) -> torch.Tensor:
    """Deterministic k-means++-like start: the median-spread row, then repeatedly the row farthest from all chosen."""
    spread = points[:, -1] - points[:, 0]
    chosen = [int(torch.argsort(spread, stable=True)[len(spread) // 2])]
    distance = (points - points[chosen[0]]).square().sum(dim=1)
    for _ in range(count - 1):
        chosen.append(int(distance.argmax()))
        distance = torch.minimum(distance, (points - points[chosen[-1]]).square().sum(dim=1))
    return points[chosen].clone()
