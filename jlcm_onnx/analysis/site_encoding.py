"""The encoding of one weight site as the plan says: its matrix, in the row order the plan stores it, in the format
the registry picks for it (:mod:`jlcm_onnx.encodings.registry`).

``moveaxis(W, row_axis, 0).reshape(rows, -1)`` is re-ordered by the site's stored order (when the re-ordering could not
be folded into the graph) and fitted by its format, with the importance ``diag(H)`` per column when calibration
statistics hold a Gram (so the fit is best where the layer's inputs are large) and then, with the Gram, learned against
the layer's output error. Both the sequential calibration pass and the encoder use it, so a weight learned early is
encoded exactly as the encoder would have. :func:`stand_in_encoding` gives the same arrays all zero, without fitting.
"""

from __future__ import annotations

import numpy as np

from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.base import EncodeRequest, SiteEncoding, codebook_dtype
from jlcm_onnx.encodings.registry import encoding_for
from jlcm_onnx.encodings.sqnr import encoding_sqnr_db
from jlcm_onnx.ir.weight_sites import WeightSite, is_lone_table_gather


def encode_site(site: WeightSite, row_axis: int, config: CompressionConfig, plan: CompressionPlan) -> SiteEncoding:
    """Encodes ``site`` with the plan's bits, groups, row order and statistics (learned when a Gram is there)."""
    weight = site.array()
    matrix = np.ascontiguousarray(np.moveaxis(weight, row_axis, 0).reshape(weight.shape[row_axis], -1), np.float32)
    del weight  # when the rows had to be moved to the front, the copy is all that is needed
    encoding = encoding_for(site, row_axis, config)
    grouping = plan.groupings.get(site.name)
    stored_order = None if grouping is None else grouping.stored_order
    if stored_order is not None:
        matrix = matrix[stored_order]
    restore = None if stored_order is None else np.argsort(stored_order)
    encoded = plan.encodings.get(site.name)
    if encoded is not None:  # encoded (and learned) earlier in this run, by the sequential calibration
        error = plan.layer_errors.get(site.name)
        return SiteEncoding(encoding, _sqnr(matrix, encoded, plan), encoded, restore, error is not None, error)
    statistics = plan.statistics.get(site.name)
    importance = None if statistics is None else statistics.importance(matrix.shape[0])
    encoded = encoding.encode(matrix, _request(site, row_axis, matrix.shape, matrix, config, plan, importance), site,
                              row_axis, config)
    if statistics is None or statistics.gram is None:
        return SiteEncoding(encoding, _sqnr(matrix, encoded, plan), encoded, restore, False)
    learned, error = encoding.learn(matrix, encoded, statistics.gram, config, plan.device)
    return SiteEncoding(encoding, _sqnr(matrix, learned, plan), learned, restore, True, error)


def stand_in_encoding(site: WeightSite, row_axis: int, config: CompressionConfig, plan: CompressionPlan) -> object:
    """An all-zero encoding of ``site`` with every array :func:`encode_site` would make, in its shape and dtype (the
    same bits, groups, outlier count, input blocks and codebook dtype), so its decoder and stored bytes are those of
    the real encoding; nothing is fitted."""
    weight = site.array()
    rows = weight.shape[row_axis]
    shape = (rows, weight.size // rows)
    request = _request(site, row_axis, shape, weight, config, plan, None)
    return encoding_for(site, row_axis, config).stand_in(*shape, request, site, row_axis, config)


def _request(site: WeightSite, row_axis: int, shape: tuple[int, int], weight: np.ndarray, config: CompressionConfig,
             plan: CompressionPlan, importance: np.ndarray | None) -> EncodeRequest:
    """What the plan asks of ``site``'s matrix of ``shape`` [rows, cols]; ``weight`` (any layout) sets the dtype."""
    return EncodeRequest(plan.choice(site.name).bits, plan.group_sizes(site.name, *shape),
                         codebook_dtype(config, site, weight), importance,
                         _outlier_fraction(site, row_axis, plan), plan.chunk_weights)


def _sqnr(matrix: np.ndarray, encoded: object, plan: CompressionPlan) -> float:
    return encoding_sqnr_db(matrix, encoded, plan.chunk_weights)


def _outlier_fraction(site: WeightSite, row_axis: int, plan: CompressionPlan) -> float:
    """The plan's outlier fraction, except none for a table decoded row by row (its decoder reads no outliers)."""
    return 0.0 if is_lone_table_gather(site, row_axis) else plan.choice(site.name).outlier_fraction
