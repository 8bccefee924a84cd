"""The encoding of one weight site as the plan says: its matrix, in the row order the plan stores it, in the format
the registry picks for it (:mod:`jlcm_onnx.encodings.registry`).

``moveaxis(W, row_axis, 0).reshape(rows, -1)`` is re-ordered by the site's stored order (when the re-ordering could not
be folded into the graph) and fitted by its format, with the importance ``diag(H)`` per column when calibration
statistics hold a Gram (so the fit is best where the layer's inputs are large) and then, with the Gram, learned against
the layer's output error. Both the sequential calibration pass and the encoder use it, so a weight learned early is
encoded exactly as the encoder would have. :func:`stand_in_encoding` gives the same arrays all zero, without fitting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.base import EncodeRequest, Encoding, SiteEncoding, codebook_dtype
from jlcm_onnx.encodings.registry import encoding_for
from jlcm_onnx.encodings.sqnr import encoding_sqnr_db
from jlcm_onnx.ir.lazy_weights import tensor_array
from jlcm_onnx.ir.weight_sites import WeightSite, is_lone_table_gather, is_tied_table


def encode_site(site: WeightSite, row_axis: int, config: CompressionConfig, plan: CompressionPlan) -> SiteEncoding:
    """Encodes ``site`` with the plan's bits, groups, row order and statistics (learned when a Gram is there)."""
    encoded = plan.encodings.get(site.name)
    if encoded is None:
        return encode_job(site, row_axis, config, plan).run()
    # encoded (and learned) earlier in this run, by the sequential calibration
    matrix, restore = _stored_matrix(site.array(), row_axis, _stored_order(site, plan))
    error = plan.layer_errors.get(site.name)
    return SiteEncoding(encoding_for(site, row_axis, config), _sqnr(matrix, encoded, plan.chunk_weights), encoded,
                        restore, error is not None, error)


@dataclass
class EncodeJob:
    """One weight's encoding with everything read from the graph and the plan, so that it runs anywhere: in this
    process, a worker process or a machine of a cluster (it pickles small: a weight still in its file travels as its
    file's path and offset, :meth:`with_values` makes it carry its values instead). :meth:`run` gives what
    :func:`encode_site` gives."""

    name: str
    weight: onnx.TensorProto | np.ndarray
    data_type: int
    row_axis: int
    encoding: Encoding
    request: EncodeRequest
    stored_order: np.ndarray | None
    gram: np.ndarray | None
    config: CompressionConfig
    device: str

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.weight.dims if isinstance(self.weight, onnx.TensorProto) else self.weight.shape))

    def with_values(self) -> EncodeJob:
        """This job carrying its weight's values (for a machine that cannot read the weight's file)."""
        values = self.weight if isinstance(self.weight, np.ndarray) else np.array(tensor_array(self.weight))
        return replace(self, weight=values)

    def run(self) -> SiteEncoding:
        weight = self.weight if isinstance(self.weight, np.ndarray) else tensor_array(self.weight)
        matrix, restore = _stored_matrix(weight, self.row_axis, self.stored_order)
        del weight
        request = replace(self.request, dtype=codebook_dtype(self.config, self.data_type, matrix))
        encoded = self.encoding.encode(matrix, request, self.config)
        if self.gram is None:
            return SiteEncoding(self.encoding, _sqnr(matrix, encoded, self.request.chunk_weights), encoded, restore,
                                False)
        learned, error = self.encoding.learn(matrix, encoded, self.gram, self.config, self.device)
        return SiteEncoding(self.encoding, _sqnr(matrix, learned, self.request.chunk_weights), learned, restore, True,
                            error)


def encode_job(site: WeightSite, row_axis: int, config: CompressionConfig, plan: CompressionPlan) -> EncodeJob:
    """The :class:`EncodeJob` of ``site`` (the importance of each input, ``diag(H)``, with calibration statistics:
    the fit is best where the layer's inputs are large)."""
    encoding = encoding_for(site, row_axis, config)
    shape = site.shape
    rows = shape[row_axis]
    matrix_shape = (rows, site.num_elements // max(rows, 1))
    statistics = plan.statistics.get(site.name)
    importance = None if statistics is None else statistics.importance(rows)
    request = _request(site, row_axis, matrix_shape, None, config, plan, importance, encoding)  # dtype: see run
    gram = None if statistics is None else statistics.gram
    return EncodeJob(site.name, site.tensor, site.tensor.data_type, row_axis, encoding, request,
                     _stored_order(site, plan), gram, config, plan.device)


def _stored_order(site: WeightSite, plan: CompressionPlan) -> np.ndarray | None:
    grouping = plan.groupings.get(site.name)
    return None if grouping is None else grouping.stored_order


def _stored_matrix(weight: np.ndarray, row_axis: int, stored_order: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(``moveaxis(weight, row_axis, 0).reshape(rows, -1)`` in float32, rows in stored order; the permutation back to
    the original order, or None)."""
    matrix = np.ascontiguousarray(np.moveaxis(weight, row_axis, 0).reshape(weight.shape[row_axis], -1), np.float32)
    if stored_order is None:
        return matrix, None
    return matrix[stored_order], np.argsort(stored_order)


def stand_in_encoding(site: WeightSite, row_axis: int, config: CompressionConfig, plan: CompressionPlan) -> object:
    """An all-zero encoding of ``site`` with every array :func:`encode_site` would make, in its shape and dtype (the
    same bits, groups, outlier count, input blocks and codebook dtype), so its decoder and stored bytes are those of
    the real encoding; nothing is fitted."""
    weight = site.array()
    rows = weight.shape[row_axis]
    shape = (rows, weight.size // rows)
    request = _request(site, row_axis, shape, weight, config, plan, None)
    return encoding_for(site, row_axis, config).stand_in(*shape, request, site, row_axis, config)


def _request(site: WeightSite, row_axis: int, shape: tuple[int, int], weight: np.ndarray | None,
             config: CompressionConfig, plan: CompressionPlan, importance: np.ndarray | None,
             encoding: Encoding | None = None) -> EncodeRequest:
    """What the plan asks of ``site``'s matrix of ``shape`` [rows, cols]; ``weight`` (any layout) sets the dtype (see
    :func:`~jlcm_onnx.encodings.base.codebook_dtype`; None: as if float16 holds it)."""
    encoding = encoding or encoding_for(site, row_axis, config)
    return EncodeRequest(plan.choice(site.name).bits, plan.group_sizes(site.name, *shape),
                         codebook_dtype(config, site.tensor.data_type, weight), importance,
                         _outlier_fraction(site, row_axis, plan), plan.chunk_weights,
                         encoding.fit_options(site, row_axis, config), is_tied_table(site, row_axis))


def _sqnr(matrix: np.ndarray, encoded: object, chunk_weights: int) -> float:
    return encoding_sqnr_db(matrix, encoded, chunk_weights)


def _outlier_fraction(site: WeightSite, row_axis: int, plan: CompressionPlan) -> float:
    """The plan's outlier fraction, except none for a table read only by its row decoder (which keeps none)."""
    return 0.0 if is_lone_table_gather(site, row_axis) else plan.choice(site.name).outlier_fraction
