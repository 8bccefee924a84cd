"""Measured weight error of every (bits, groups) option of every tensor: what the size planner trades bytes against.

The planner (:mod:`jlcm_onnx.pipeline.size_target`) minimises the summed relative error of the tensors under a byte
budget::

    minimise  sum_t D_t(b_t, G_t)   subject to   sum_t cost_t(b_t, G_t) <= budget
    D_t = ||W_t - W^_t||^2 / ||W_t||^2

For a layer ``y = W x`` with inputs of similar energy in every direction, the relative output error equals the relative
weight error, and to first order the relative errors of successive layers add up, so every tensor counts the same
whatever its size: a small depthwise convolution at 2 bits hurts the output as much as a large projection at 2 bits.

``D_t`` is measured, not modelled: k-means at low bits, outliers and heavy tails are far from the ``4^-b`` rule. For
each option the rows are grouped as the passes would group them (clustered on their quantiles and sorted by cluster
when the re-ordering is on, else contiguous), ``SAMPLE_ROWS`` rows are taken evenly through that order, so every group
keeps its share, and the sample is encoded with the configured encoding, codebook dtype and outliers. The group count
of the sample is the full count scaled by the sampling fraction, so each sampled group holds about as many weights per
codeword as a full one. Plain codebooks (no input blocks) need no encoding: each sampled group is sorted once for all
bit widths and the k-means error is read off its prefix sums (:func:`jlcm_onnx.encodings.codebook.codebook_errors`).
Tensors are measured in parallel, one per CPU core.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import onnx

from jlcm_onnx.analysis.grouping import RowClusterings, RowGroups
from jlcm_onnx.analysis.plan import CompressionPlan, TensorChoice
from jlcm_onnx.config import MAX_BITS, CompressionConfig
from jlcm_onnx.devices import map_on_cores
from jlcm_onnx.encodings.base import Encoding, codebook_dtype
from jlcm_onnx.encodings.codebook import equal_group_sizes
from jlcm_onnx.encodings.registry import encoding_for
from jlcm_onnx.ir.weight_sites import WeightSite, compressible_sites

#: Group counts the planner chooses from, besides ``None`` (one codebook per row); fine steps come later.
GROUP_LADDER = (1, 4, 16, 64, 256)
#: Rows of a tensor encoded to measure an option's error.
SAMPLE_ROWS = 128
#: Lloyd iterations of the measuring k-means (the encoder runs to convergence; 25 gets within a few percent).
ESTIMATE_ITERATIONS = 25

ErrorTable = dict[str, dict[TensorChoice, float]]


def tensor_options(rows: int, max_bits: int = MAX_BITS) -> list[TensorChoice]:
    """Every (bits, groups) option of a tensor with ``rows`` output rows."""
    groups: list[int | None] = [g for g in GROUP_LADDER if g < rows] + [None]
    return [TensorChoice(bits, g) for bits in range(1, max_bits + 1) for g in groups]


def estimate_errors(model: onnx.ModelProto, config: CompressionConfig, progress: bool = False,
                    clusterings: RowClusterings | None = None) -> ErrorTable:
    """``D_t`` of every option (:func:`tensor_options`) of every compressible tensor of ``model``; the row
    clusterings are kept in ``clusterings`` for the runs that follow."""
    clusterings = RowClusterings() if clusterings is None else clusterings
    sites = compressible_sites(model, config)

    def measure(site_and_axis: tuple[WeightSite, int]) -> dict[TensorChoice, float]:
        site, row_axis = site_and_axis
        weight = site.array()
        rows = weight.shape[row_axis]
        matrix = np.ascontiguousarray(np.moveaxis(weight, row_axis, 0).reshape(rows, -1), dtype=np.float32)
        cluster = partial(clusterings.cluster, site.name, matrix) if config.reorder else None
        encoding = encoding_for(site, row_axis, config)
        return _tensor_errors(site.name, matrix, config, codebook_dtype(config, site.tensor.data_type, matrix), cluster,
                              encoding)

    def sampled_elements(site_and_axis: tuple[WeightSite, int]) -> float:
        site, row_axis = site_and_axis
        rows = site.shape[row_axis]
        return min(rows, SAMPLE_ROWS) * site.num_elements / rows

    errors = map_on_cores(measure, sites, description="measuring options", weight=sampled_elements, progress=progress)
    return {site.name: options for (site, _), options in zip(sites, errors, strict=True)}


def _tensor_errors(
    name: str, matrix: np.ndarray, config: CompressionConfig, dtype: np.dtype,
    cluster: Callable[[int], RowGroups] | None, encoding: Encoding,
) -> dict[TensorChoice, float]:
    rows, cols = matrix.shape
    by_count: dict[int, list[TensorChoice]] = {}
    for option in tensor_options(rows, config.max_bits):
        by_count.setdefault(CompressionPlan(config, choices={name: option}).groups(name, rows, cols), []).append(option)
    errors: dict[TensorChoice, float] = {}
    for count, options in by_count.items():
        sample_rows, sizes = _sampled_groups(cluster, rows, count)
        sample = matrix[sample_rows]
        signal = float(np.sum(sample.astype(np.float64) ** 2))
        noise = encoding.squared_errors(sample, [option.bits for option in options], sizes, dtype, config,
                                        ESTIMATE_ITERATIONS)
        errors.update({option: noise[option.bits] / signal if signal > 0 else 0.0 for option in options})
    return errors


def _sampled_groups(
    cluster: Callable[[int], RowGroups] | None, rows: int, count: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The sampled rows in grouped order and the sample's group sizes, for ``count`` groups over ``rows`` rows
    (clustered by ``cluster(count)``, else contiguous)."""
    sample = min(rows, SAMPLE_ROWS)
    if 1 < count < rows and cluster is not None:
        order = cluster(count)
        labels = np.repeat(np.arange(len(order.sizes)), order.sizes)
        picks = np.linspace(0, rows - 1, sample).round().astype(int)
        sizes = np.bincount(labels[picks], minlength=len(order.sizes))
        sample_count = max(1, round(count * sample / rows))
        if sample_count < np.count_nonzero(sizes):  # fewer sampled groups than clusters met: merge neighbours
            sizes = np.array(equal_group_sizes(sample, sample_count))
        return order.permutation[picks], tuple(int(s) for s in sizes if s > 0)
    picks = np.linspace(0, rows - 1, sample).round().astype(int)
    return picks, equal_group_sizes(sample, max(1, round(count * sample / rows)))
