"""Vector codebooks: every d consecutive inputs of a row share one code into a codebook of ``K = 2^(b d)``
d-dimensional entries per group of rows (``vector_dim`` d = 2, 4 or 8, with or without input blocks)::

    W^[r, j d + a] = C[g(r), I[r, j], a]                 (scaled and shifted per input block, with input blocks)

b bits per weight as scalar codebooks have, but the codewords sit anywhere in R^d, not on a product grid, so they
follow the joint distribution of neighbouring weights (BENCHMARKS.md compares them with scalar codebooks at equal
bits on every model). A codebook costs ``c K d`` bytes (c per value), so groups are sized to share one among many rows
(:func:`vector_groups`). Fitted by
weighted k-means in d dimensions (:mod:`jlcm_onnx.encodings.vector_kmeans`), learned GPTVQ-style
(:mod:`jlcm_onnx.encodings.vector_learning`), decoded by GatherElements on each row's codebook flattened to K d values,
at ``I d + a`` (:mod:`jlcm_onnx.encodings.codebook_decoder`).
"""

from __future__ import annotations

import numpy as np

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.codebook import EncodedMatrix
from jlcm_onnx.encodings.codebook_formats import CodebookFormat
from jlcm_onnx.encodings.vector_learning import learn_vectors
from jlcm_onnx.ir.weight_sites import WeightSite

#: Default groups give each codebook at least this many weights per stored codebook value (fp16: at most 1/8 bit
#: per weight for the codebooks).
WEIGHTS_PER_CODEBOOK_VALUE = 128


def vector_groups(rows: int, cols: int, bits: int, vector_dim: int) -> int:
    """The default group count of a weight [rows, cols] in vector codebooks: as many as keep each codebook's
    ``2^(b d) d`` values to :data:`WEIGHTS_PER_CODEBOOK_VALUE` weights each, at least one."""
    span = WEIGHTS_PER_CODEBOOK_VALUE * (1 << bits * vector_dim) * vector_dim
    return max(1, min(rows, rows * cols // span))


class VectorCodebook(CodebookFormat):
    """A codebook of ``2^(b d)`` vectors per group of rows, one code per d consecutive inputs (see the module)."""

    name = "vector codebook"

    def selects(self, site: WeightSite, row_axis: int, config: CompressionConfig) -> bool:
        rows = site.shape[row_axis]
        return config.vector_dim > 1 and (site.num_elements // max(rows, 1)) % config.vector_dim == 0

    def vector_dim(self, config: CompressionConfig) -> int:
        return config.vector_dim

    def learn(self, matrix: np.ndarray, encoded: EncodedMatrix, gram: np.ndarray, config: CompressionConfig,
              device: str) -> tuple[EncodedMatrix, float]:
        return learn_vectors(matrix, encoded, gram)

    def learning(self, config: CompressionConfig) -> str:
        return "error-feedback, closed-form codebooks"

    def describe(self, encoded: EncodedMatrix) -> str:
        blocks = f", input blocks of {encoded.block_size}" if encoded.blocked else ""
        return f"{self.name} of {encoded.vector_dim}{blocks}"
