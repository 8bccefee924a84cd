"""The encoding of one weight site: its matrix, in the row order the plan stores it, encoded as the plan says.

``moveaxis(W, row_axis, 0).reshape(rows, -1)`` is re-ordered by the site's stored order (when the re-ordering could not
be folded into the graph), encoded with k-means codebooks (importance ``diag(H)`` per column when calibration
statistics hold a Gram, so the codewords sit where the layer's inputs are large) and, with a Gram, learned jointly
(:func:`jlcm_onnx.encodings.learning.learn_layer`; a large tensor a block of row groups at a time,
:mod:`jlcm_onnx.encodings.row_block_learning`). Both the sequential calibration pass and the encoder use it, so a weight
learned early is encoded exactly as the encoder would have.

With ``speed="fast"`` the weights are encoded in affine blocks instead (a lone embedding table only with float offsets)
(:mod:`jlcm_onnx.encodings.affine_blocks`: data-free fit weighted by ``diag(H)``, then learned against the Gram when
there is one), in its original row order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.affine_blocks import AffineBlocks, fit_affine_blocks, learn_affine_blocks
from jlcm_onnx.encodings.codebook import (
    EncodedMatrix,
    encode_matrix,
    encode_scaled_matrix,
    encoding_sqnr_db,
    outlier_count,
)
from jlcm_onnx.encodings.row_block_learning import learn_in_row_blocks
from jlcm_onnx.ir.weight_sites import WeightSite, is_lone_matrix_input, is_lone_table_gather

FLOAT16_MAX = float(np.finfo(np.float16).max)
FLOAT16_MIN_NORMAL = float(np.finfo(np.float16).tiny)


@dataclass(frozen=True)
class SiteEncoding:
    """The ``encoded`` form of the site's matrix (rows in stored order), its ``sqnr_db`` against the matrix,
    ``restore`` (the permutation back to the original row order, ``None`` when rows are stored in order), whether the
    codes were ``learned`` from data and then the ``layer_error``, the layer objective reached (see
    :mod:`jlcm_onnx.encodings.learning`). The dense matrix is not kept: a run holds only the encodings it has made."""

    sqnr_db: float
    encoded: EncodedMatrix | AffineBlocks
    restore: np.ndarray | None
    learned: bool
    layer_error: float | None = None

    def decoded_weight(self, shape: tuple[int, ...], row_axis: int) -> np.ndarray:
        """The decoded weight in the layout of the original tensor (float32)."""
        decoded = self.encoded.decode()
        if self.restore is not None:
            decoded = decoded[self.restore]
        moved = (shape[row_axis], *(size for axis, size in enumerate(shape) if axis != row_axis))
        return np.moveaxis(decoded.reshape(moved), 0, row_axis)


def encode_site(site: WeightSite, row_axis: int, config: CompressionConfig, plan: CompressionPlan) -> SiteEncoding:
    """Encodes ``site`` with the plan's bits, groups, row order and statistics (learned when a Gram is there)."""
    weight = site.array()
    matrix = np.ascontiguousarray(np.moveaxis(weight, row_axis, 0).reshape(weight.shape[row_axis], -1), np.float32)
    del weight  # when the rows had to be moved to the front, the copy is all that is needed
    choice = plan.choice(site.name)
    grouping = plan.groupings.get(site.name)
    stored_order = None if grouping is None else grouping.stored_order
    if stored_order is not None:
        matrix = matrix[stored_order]
    statistics = plan.statistics.get(site.name)
    gram = None if statistics is None else statistics.gram
    restore = None if stored_order is None else np.argsort(stored_order)
    encoded = plan.encodings.get(site.name)
    if encoded is not None:  # encoded (and learned) earlier in this run, by the sequential calibration
        error = plan.layer_errors.get(site.name)
        return SiteEncoding(_sqnr(matrix, encoded, plan), encoded, restore, error is not None, error)
    if uses_affine_blocks(site, row_axis, config):
        return _encode_affine_blocks(site, row_axis, matrix, config, plan)
    encode = encode_scaled_matrix if config.encoding == "multi-scaling" else encode_matrix
    encoded = encode(
        matrix, choice.bits, plan.group_sizes(site.name, *matrix.shape), codebook_dtype(config, site, matrix),
        config.kmeans_iterations, importance=None if statistics is None else statistics.importance(matrix.shape[0]),
        outlier_fraction=_outlier_fraction(site, row_axis, plan), chunk_weights=plan.chunk_weights,
        **({} if config.codebook_block_size is None else {"block_size": config.codebook_block_size}),
    )
    if gram is None:
        return SiteEncoding(_sqnr(matrix, encoded, plan), encoded, restore, False)
    result = learn_in_row_blocks(matrix, encoded, gram, mapping=config.mapping, init=config.init,
                                 steps=config.learning_steps, seed=config.seed, device=plan.device)
    return SiteEncoding(_sqnr(matrix, result.encoded, plan), result.encoded, restore, True, result.final_objective)


def _sqnr(matrix: np.ndarray, encoded: EncodedMatrix | AffineBlocks, plan: CompressionPlan) -> float:
    return encoding_sqnr_db(matrix, encoded, plan.chunk_weights)


def uses_affine_blocks(site: WeightSite, row_axis: int, config: CompressionConfig) -> bool:
    """True when ``site`` is encoded in affine blocks: with ``speed="fast"``, every weight but a table read by one
    Gather, which keeps per-row codebooks unless float offsets are asked for (either way its row decoder decodes
    only the looked-up rows)."""
    if config.speed != "fast":
        return False
    return config.affine_offsets == "float" or not is_lone_table_gather(site, row_axis)


def affine_layout(site: WeightSite, row_axis: int, config: CompressionConfig) -> str:
    """How an affine-blocks weight is written (:mod:`jlcm_onnx.encodings.affine_decoder`): ``"fused"`` (the B of a
    lone MatMul or Gemm), ``"transposed gemm"`` (a lone Gemm with transB=1), ``"offset matmul"`` (a lone MatMul with
    float offsets, its inputs whole blocks), ``"row decoder"`` (a table read by one Gather: the codebook row decoder
    with the grid as codebook and the blocks as input blocks), or for any other reader ``"unpacked"`` (dequantised on
    every run) or, with ``decode_at_load``, ``"folded"`` (the codebook decoder without a gate, folded at load)."""
    if is_lone_table_gather(site, row_axis):
        return "row decoder"
    if row_axis == 0 and is_lone_matrix_input(site, 0, "Gemm", 1):
        return "transposed gemm"
    if row_axis != 1 or not any(is_lone_matrix_input(site, 1, op, 1) for op in ("MatMul", "Gemm")):
        return "folded" if config.decode_at_load else "unpacked"
    whole_blocks = site.shape[0] % config.affine_block_size == 0
    if config.affine_offsets == "float" and whole_blocks and site.consumers[0].node.op_type == "MatMul":
        return "offset matmul"
    return "fused"


def has_float_offsets(layout: str, config: CompressionConfig) -> bool:
    """Whether a weight written in ``layout`` stores float offsets: asked for, and a layout that carries them; always
    when folded at load (the codebook decoder stores offsets in the codebook dtype, which ``-s z`` may not fit)."""
    return layout == "folded" or (config.affine_offsets == "float"
                                  and layout in ("offset matmul", "row decoder", "unpacked"))


def _encode_affine_blocks(site: WeightSite, row_axis: int, matrix: np.ndarray, config: CompressionConfig,
                          plan: CompressionPlan) -> SiteEncoding:
    statistics = plan.statistics.get(site.name)
    importance = None if statistics is None else statistics.importance(matrix.shape[0])
    encoded = fit_affine_blocks(matrix, plan.choice(site.name).bits, config.affine_block_size,
                                codebook_dtype(config, site, matrix), importance,
                                float_offsets=has_float_offsets(affine_layout(site, row_axis, config), config),
                                chunk_weights=plan.chunk_weights)
    if statistics is None or statistics.gram is None:
        return SiteEncoding(_sqnr(matrix, encoded, plan), encoded, None, False)
    learned, error = learn_affine_blocks(matrix, encoded, statistics.gram)
    return SiteEncoding(_sqnr(matrix, learned, plan), learned, None, True, error)


def placeholder_encoding(site: WeightSite, row_axis: int, config: CompressionConfig,
                         plan: CompressionPlan) -> EncodedMatrix:
    """An all-zero encoding of ``site`` with every array :func:`encode_site` would make, in its shape and dtype (the
    same bits, groups, outlier count, input blocks and codebook dtype), so its decoder and stored bytes are those of
    the real encoding; nothing is fitted. The outliers are spread evenly, so each column block of a blocked MatMul
    gets its share (and its outlier nodes), as real outliers almost always do."""
    weight = site.array()
    rows = weight.shape[row_axis]
    cols = weight.size // rows
    choice = plan.choice(site.name)
    sizes = plan.group_sizes(site.name, rows, cols)
    dtype = codebook_dtype(config, site, weight)
    entries = 1 << choice.bits
    outliers = outlier_count(weight.size, _outlier_fraction(site, row_axis, plan))
    spread = np.arange(outliers, dtype=np.int64) * weight.size // max(outliers, 1)
    fields: dict = dict(codebooks=np.zeros((len(sizes), entries), dtype), codes=np.zeros((rows, cols), np.uint8),
                        group_sizes=sizes, outlier_index=spread, outlier_values=np.zeros(outliers, dtype))
    if config.encoding == "multi-scaling":
        fields.update(codebooks=np.zeros((len(sizes), entries), np.float32), scales=np.zeros(len(sizes), dtype),
                      shared_codebook=np.zeros(entries, dtype))
    elif config.codebook_block_size is not None:
        blocks = np.zeros((rows, -(-cols // config.codebook_block_size)), dtype)
        fields.update(block_size=config.codebook_block_size, block_scales=blocks, block_offsets=blocks)
    return EncodedMatrix(**fields)


def _outlier_fraction(site: WeightSite, row_axis: int, plan: CompressionPlan) -> float:
    """The plan's outlier fraction, except none for a table decoded row by row (its decoder reads no outliers)."""
    return 0.0 if is_lone_table_gather(site, row_axis) else plan.choice(site.name).outlier_fraction


def codebook_dtype(config: CompressionConfig, site: WeightSite, matrix: np.ndarray) -> np.dtype:
    """The configured codebook dtype, except: float16 for a float16 weight (what its decoder reads), and float32 where
    float16 cannot hold the weights (overflow above 65504, or magnitudes lost in float16's subnormal range)."""
    if site.tensor.data_type == onnx.TensorProto.FLOAT16:
        return np.dtype(np.float16)
    magnitude = max(-float(matrix.min(initial=0.0)), float(matrix.max(initial=0.0)))  # no |matrix| temporary
    if config.codebook_dtype == "float16" and (magnitude > FLOAT16_MAX or 0.0 < magnitude < FLOAT16_MIN_NORMAL * 1024):
        return np.dtype(np.float32)
    return np.dtype(config.codebook_dtype)
