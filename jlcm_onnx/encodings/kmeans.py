"""Batched, weighted 1-D k-means (Lloyd) for scalar codebooks.

For one group of values ``w_i`` with importances ``h_i >= 0`` a codebook ``c_0 <= ... <= c_{K-1}`` minimises::

    D(c) = sum_i h_i * min_k (w_i - c_k)^2

In one dimension the nearest-codeword cells are intervals, so the assignment step is a ``searchsorted`` against the
midpoints ``(c_k + c_{k+1}) / 2`` and the update step is a weighted mean per cell (a ``bincount``); both run on every
group of a batch at once. Codebooks start at the quantiles ``(k + 1/2) / K`` of each group (deterministic, close to the
Lloyd-Max optimum for smooth distributions), and Lloyd iterates until no assignment changes. A group with at most K
distinct values gets exactly those values, so such weights survive quantization unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Codebooks:
    """``values[g]`` is group g's sorted codebook [G, K]; ``codes[g, i]`` the index of value i of group g [G, m]."""

    values: np.ndarray
    codes: np.ndarray


def nearest_codes(values: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword, per group: values [G, m], sorted codebooks [G, K] -> int64 [G, m]."""
    midpoints = (codebooks[:, 1:] + codebooks[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def _quantile_init(sorted_values: torch.Tensor, mass_prefix: torch.Tensor, num_codes: int) -> torch.Tensor:
    """The importance-weighted quantiles ``(k + 1/2) / K`` of each group (values of zero importance never picked)."""
    levels = (torch.arange(num_codes, dtype=torch.float64) + 0.5) / num_codes
    targets = mass_prefix[:, -1:] * levels[None, :]
    positions = torch.searchsorted(mass_prefix[:, 1:].contiguous(), targets.contiguous())
    return sorted_values.gather(1, positions.clamp_(max=sorted_values.shape[1] - 1))


def _distinct_value_codebooks(sorted_values: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebooks made of the distinct values of each group, for the groups that have at most ``num_codes`` of them.

    Returns (mask [G], codebooks [G, K]); a group's codebook is padded by repeating its largest value.
    """
    is_new = torch.ones_like(sorted_values, dtype=torch.bool)
    is_new[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    rank = is_new.long().cumsum(dim=1) - 1
    fits = rank[:, -1] < num_codes
    slots = rank.clamp(max=num_codes - 1)
    codebooks = sorted_values[:, -1:].repeat(1, num_codes)
    codebooks.scatter_(1, slots, sorted_values)
    return fits, codebooks


@dataclass(frozen=True)
class SortedGroups:
    """A batch of groups [G, m], each sorted, with the prefix sums of its importances ``h`` and of ``h w``: Lloyd
    iterates on these, and the error of any codebooks is read off them (:meth:`squared_errors`), so one sort serves
    every codebook size."""

    values: torch.Tensor
    weights: torch.Tensor
    mass_prefix: torch.Tensor
    moment_prefix: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor, importance: torch.Tensor | None = None) -> SortedGroups:
        values = values.to(torch.float64)
        if importance is None:  # numpy's CPU sort is several times faster than torch's
            sorted_values = torch.from_numpy(np.sort(values.numpy(), axis=1))
            weights = torch.ones_like(values)
        else:
            order = torch.from_numpy(np.argsort(values.numpy(), axis=1))
            sorted_values, weights = values.gather(1, order), importance.to(torch.float64).gather(1, order)
        return cls(sorted_values, weights, _prefix(weights), _prefix(weights * sorted_values))

    def squared_errors(self, codebooks: torch.Tensor) -> torch.Tensor:
        """``sum_i h_i (w_i - c(w_i))^2`` of each group [G] for sorted codebooks [G, K], ``c(w)`` the nearest codeword
        (ties to the lower one, as :func:`nearest_codes`): per cell, ``S2 - 2 c S1 + c^2 S0`` of its prefix sums."""
        edges = _cell_edges(self.values, codebooks)
        energy_prefix = _prefix(self.weights * self.values**2)
        mass, moment, energy = (prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])
                                for prefix in (self.mass_prefix, self.moment_prefix, energy_prefix))
        return (energy - 2 * codebooks * moment + codebooks**2 * mass).sum(dim=1).clamp(min=0.0)


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums along the rows, [G, m] -> [G, m + 1]."""
    return torch.cat([torch.zeros(values.shape[0], 1, dtype=values.dtype), values.cumsum(dim=1)], dim=1)


def lloyd(
    groups: SortedGroups,
    num_codes: int,
    max_iterations: int = 100,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted k-means codebooks [G, K] (float64) of each group of ``groups``, from the quantile start or from the sorted
    codebooks ``start`` [G, K]."""
    sorted_values, mass_prefix, moment_prefix = groups.values, groups.mass_prefix, groups.moment_prefix
    codebooks = _quantile_init(sorted_values, mass_prefix, num_codes) if start is None else start.to(torch.float64)
    edges = None
    for _ in range(max_iterations):
        new_edges = _cell_edges(sorted_values, codebooks)
        if edges is not None and torch.equal(new_edges, edges):
            break
        edges = new_edges
        mass = mass_prefix.gather(1, edges[:, 1:]) - mass_prefix.gather(1, edges[:, :-1])
        moment = moment_prefix.gather(1, edges[:, 1:]) - moment_prefix.gather(1, edges[:, :-1])
        means = moment / mass.clamp(min=1e-300)
        codebooks = torch.where(mass > 0, means, codebooks)
        if not bool((codebooks[:, 1:] >= codebooks[:, :-1]).all()):  # cell means are ordered up to rounding
            codebooks = codebooks.sort(dim=1).values
    fits, exact = _distinct_value_codebooks(sorted_values, num_codes)
    return torch.where(fits[:, None], exact, codebooks)


def _cell_edges(sorted_values: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Cell k of a group is ``sorted_values[edges[k]:edges[k+1]]``; returns int64 edges [G, K+1]."""
    midpoints = (codebooks[:, 1:] + codebooks[:, :-1]) / 2
    inner = torch.searchsorted(sorted_values, midpoints.contiguous(), right=True)
    groups, m = sorted_values.shape
    first = torch.zeros(groups, 1, dtype=torch.int64)
    return torch.cat([first, inner, torch.full((groups, 1), m, dtype=torch.int64)], dim=1)


def fit_codebooks(
    values: np.ndarray,
    bits: int,
    codebook_dtype: np.dtype,
    importance: np.ndarray | None = None,
    max_iterations: int = 100,
    start: np.ndarray | None = None,
) -> Codebooks:
    """Codebooks of 2**bits values in ``codebook_dtype`` for each row of ``values`` [G, m], with the nearest codes
    (Lloyd from the quantiles, or from the sorted codebooks ``start`` [G, 2**bits]).

    Codes are assigned against the codebook *after* rounding to ``codebook_dtype``, so they are optimal for what the
    decoder will read.
    """
    tensor = torch.from_numpy(np.asarray(values, dtype=np.float64))
    weights = None if importance is None else torch.from_numpy(np.asarray(importance, dtype=np.float64))
    first = None if start is None else torch.from_numpy(np.asarray(start, dtype=np.float64))
    rounded = rounded_codebooks(lloyd(SortedGroups.of(tensor, weights), 1 << bits, max_iterations, first),
                                codebook_dtype)
    codes = nearest_codes(tensor, rounded)
    return Codebooks(values=rounded.numpy().astype(codebook_dtype), codes=codes.numpy().astype(np.uint8))


def rounded_codebooks(codebooks: torch.Tensor, codebook_dtype: np.dtype) -> torch.Tensor:
    """Codebooks [G, K] rounded to ``codebook_dtype`` (what the decoder reads), sorted, in float64."""
    return torch.from_numpy(codebooks.numpy().astype(codebook_dtype).astype(np.float64)).sort(dim=1).values
