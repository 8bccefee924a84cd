"""The codebook formats: a weight's rows in groups, each group with its own codebook of ``2^b`` values
(multi-codebook), its own scale on one shared codebook (multi-scaling), or its own codebook with a scale and an offset
per block of B inputs (input blocks). All three are :class:`~jlcm_onnx.encodings.codebook.EncodedMatrix` values with
one decoder (:mod:`jlcm_onnx.encodings.codebook_decoder`), fitted by k-means (:mod:`jlcm_onnx.encodings.codebook`) and
learned jointly with their mappings (:mod:`jlcm_onnx.encodings.row_block_learning`).

Stored bytes of a tensor of n weights in ``rows`` output rows, at b bits with G groups, as the size planner estimates
them (docs/method.md, section 2)::

    cost(b, G) = packed(n, b) + codebook(b, G) + maps(G) + outliers + blocks + decoder(b)
    codebook   = c * G * 2^b   (multi-codebook, input blocks)   or   c * (2^b + G)   (multi-scaling)   c = value bytes
    blocks     = 2 * c * rows * ceil(cols / B)   with input blocks of B (a scale and an offset each), else 0
    maps       = row-to-group and stored-order maps when 1 < G < rows and rows are re-ordered (an upper bound)
    decoder    = the serialized decoder nodes, which depend on b through the number of byte planes (measured)
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.base import (
    DecoderContext,
    EncodeRequest,
    Encoding,
    SiteEncoding,
    WeightShape,
    WrittenDecoder,
)
from jlcm_onnx.encodings.blocked_products import build_blocked_matmul, build_tied_head
from jlcm_onnx.encodings.codebook import EncodedMatrix, codebook_errors, encode_matrix
from jlcm_onnx.encodings.codebook_decoder import DecodeSpec, build_decoder
from jlcm_onnx.encodings.multi_scaling import encode_scaled_matrix
from jlcm_onnx.encodings.outliers import outlier_count, outliers_per_row, uniform_outliers
from jlcm_onnx.encodings.packing import WordLayout
from jlcm_onnx.encodings.row_block_learning import learn_in_row_blocks
from jlcm_onnx.encodings.slot_decoder import build_weight_decoder
from jlcm_onnx.encodings.slot_tables import slot_layout, slot_packed_bytes, uses_slot_tables
from jlcm_onnx.ir.decoder_functions import BLOCKED_MATMUL, DECODE_ROWS, DECODE_WEIGHT
from jlcm_onnx.ir.graph_building import GATE_PLACEHOLDER
from jlcm_onnx.ir.weight_sites import (
    WeightSite,
    anchor_index,
    is_lone_matrix_input,
    is_lone_table_gather,
    is_tied_table,
    tied_head,
)

#: Serialized bytes of one weight's decoder by bits: a 384 x 512 MatMul weight's file less its stored data (2, 4 and 8
#: bits in slot tables, the others in L = 8/gcd(b, 8) code planes).
DECODER_BYTES = {1: 2900, 2: 3900, 3: 4400, 4: 2500, 5: 5100, 6: 3100, 7: 5800, 8: 1000}
#: Serialized bytes of the input-block scale-and-offset nodes of one decoder (measured).
BLOCK_DECODER_BYTES = 600
#: Weights of a MatMul above this count are decoded in column blocks of about this size (1 MB of fp32), one at a time.
BLOCK_WEIGHTS = 1 << 18
#: ... in at most this many blocks: onnxruntime's session load grows faster than linearly with the count of decoders
#: (measured: 512 blocks 1.2 s, 2048 7.7 s, 8192 42 s), and a 7B model at 2^18 weights a block had 24,705 of them.
MAX_COLUMN_BLOCKS = 16


def column_block_weights(size: int) -> int:
    """The weights per column block of a blocked MatMul of ``size`` weights: :data:`BLOCK_WEIGHTS`, or a
    :data:`MAX_COLUMN_BLOCKS`-th of the weight where that is more (a block is then a 16th of the weight)."""
    return max(BLOCK_WEIGHTS, -(-size // MAX_COLUMN_BLOCKS))


class CodebookFormat(Encoding):
    """What the three codebook formats share: the decoder, learning, stand-ins and the cost of codes and outliers."""

    #: The report's name of the format.
    name: ClassVar[str]

    def encode(self, matrix: np.ndarray, request: EncodeRequest, config: CompressionConfig) -> EncodedMatrix:
        return self._fit(matrix, request.bits, request.group_sizes, request.dtype, config, config.kmeans_iterations,
                         importance=request.importance, outlier_fraction=request.outlier_fraction,
                         chunk_weights=request.chunk_weights, outliers_per_row=request.outliers_per_row)

    def _fit(self, matrix: np.ndarray, bits: int, sizes: tuple[int, ...], dtype: np.dtype, config: CompressionConfig,
             iterations: int, **options: Any) -> EncodedMatrix:
        return encode_matrix(matrix, bits, sizes, dtype, iterations, block_size=config.codebook_block_size,
                             vector_dim=self.vector_dim(config), **options)

    def learn(self, matrix: np.ndarray, encoded: EncodedMatrix, gram: np.ndarray, config: CompressionConfig,
              device: str) -> tuple[EncodedMatrix, float]:
        result = learn_in_row_blocks(matrix, encoded, gram, mapping=config.mapping, init=config.init,
                                     steps=config.learning_steps, seed=config.seed, device=device)
        return result.encoded, result.final_objective

    def stand_in(self, rows: int, cols: int, request: EncodeRequest, site: WeightSite, row_axis: int,
                 config: CompressionConfig) -> EncodedMatrix:
        """The outliers are spread evenly, so each column block of a blocked MatMul gets its share (and its outlier
        nodes), as real outliers almost always do."""
        size = rows * cols
        if request.outliers_per_row:  # the first columns of every row
            per_row = outliers_per_row(cols, request.outlier_fraction)
            spread = (np.arange(rows)[:, None] * cols + np.arange(per_row)).reshape(-1)
        else:
            count = outlier_count(size, request.outlier_fraction)
            spread = np.arange(count, dtype=np.int64) * size // max(count, 1)
        dim, block_size = self.vector_dim(config), config.codebook_block_size
        fields: dict[str, Any] = dict(
            codebooks=np.zeros((len(request.group_sizes), 1 << request.bits * dim) + ((dim,) if dim > 1 else ()),
                               request.dtype),
            codes=np.zeros((rows, cols // dim), np.uint8), group_sizes=request.group_sizes, outlier_index=spread,
            outlier_values=np.zeros(spread.size, request.dtype), vector_dim=dim)
        if block_size is not None:
            blocks = np.zeros((rows, -(-cols // block_size)), request.dtype)
            fields |= dict(block_size=block_size, block_scales=blocks, block_offsets=blocks)
        return EncodedMatrix(**self._stand_in_fields(fields, rows, cols, request, config))

    def _stand_in_fields(self, fields: dict[str, Any], rows: int, cols: int, request: EncodeRequest,
                         config: CompressionConfig) -> dict[str, Any]:
        return fields

    def stored_bytes(self, shape: WeightShape, bits: int, groups: int, outlier_fraction: float,
                     config: CompressionConfig) -> int:
        dim = self.vector_dim(config)
        entries, layout = 1 << bits * dim, WordLayout(bits * dim)
        if shape.row_packed:
            packed = shape.rows * layout.packed_bytes(shape.size // shape.rows // dim)
        elif slot_layout(bits, dim, shape.size // shape.rows):
            packed = slot_packed_bytes(shape.rows, shape.size // shape.rows, bits)
        else:
            packed = layout.packed_bytes(shape.size // dim)
        maps = shape.rows * (3 if groups <= 256 else 4) if 1 < groups < shape.rows and config.reorder else 0
        if shape.row_decoded:  # a table read by its row decoder alone keeps no outliers
            outliers = 0
        elif shape.row_packed:  # a tied table keeps as many in every row: a column index and a value each
            outliers = shape.rows * outliers_per_row(shape.size // shape.rows, outlier_fraction) * (
                (2 if shape.size // shape.rows <= 1 << 16 else 4) + shape.codebook_bytes)
        else:
            outliers = round(outlier_fraction * shape.size) * (4 + shape.codebook_bytes)
        extra = self._codebook_bytes(shape, entries, groups) * dim + self._block_bytes(shape, config)
        return packed + maps + outliers + extra + DECODER_BYTES[bits * dim] + 3 * len(shape.name)

    def _codebook_bytes(self, shape: WeightShape, entries: int, groups: int) -> int:
        return shape.codebook_bytes * groups * entries

    def _block_bytes(self, shape: WeightShape, config: CompressionConfig) -> int:
        """A scale and an offset per input block of every row, and their decoder nodes (none without blocks)."""
        if config.codebook_block_size is None:
            return 0
        blocks = shape.rows * -(-(shape.size // shape.rows) // config.codebook_block_size)
        return 2 * shape.codebook_bytes * blocks + BLOCK_DECODER_BYTES

    def squared_errors(self, sample: np.ndarray, bit_widths: list[int], sizes: tuple[int, ...], dtype: np.dtype,
                       config: CompressionConfig, iterations: int) -> dict[int, float]:
        errors = {}
        for bits in bit_widths:
            encoded = self._fit(sample, bits, sizes, dtype, config, iterations,
                                outlier_fraction=config.outlier_fraction)
            errors[bits] = float(np.sum((encoded.decode().astype(np.float64) - sample) ** 2))
        return errors

    def describe(self, encoded: EncodedMatrix) -> str:
        return self.name

    def learning(self, config: CompressionConfig) -> str:
        """How the codes were learned, for the report: ``error-feedback`` or ``kmeans, 50 proximal steps``."""
        steps = config.learning_steps
        return config.init + (f", {steps} {config.mapping} step{'s' if steps > 1 else ''}" if steps else "")

    def write(self, site: WeightSite, row_axis: int, encoding: SiteEncoding, context: DecoderContext) -> WrittenDecoder:
        """The codebook decoder before the weight's first reader; for a lone embedding Gather a row decoder in its
        place, for the lone MatMul of a large weight a blocked MatMul in its place (decoded a column block at a
        time), and for a table tied to a head a row decoder for each (:meth:`_write_tied`)."""
        encoded, restore = encoding.encoded, encoding.restore
        if is_tied_table(site, row_axis) and uniform_outliers(encoded.outlier_index, *encoded.codes.shape) is not None:
            return self._write_tied(site, encoding, context)
        reader = site.graph.node[anchor_index(site)]
        boundaries = encoded.block_boundaries(column_block_weights(encoded.codes.size))
        dtype = site.tensor.data_type
        activation = None
        lone_matmul = row_axis == 1 and is_lone_matrix_input(site, row_axis, "MatMul", 1)
        if lone_matmul and (len(boundaries) > 2 or uses_slot_tables(encoded)):
            spec = DecodeSpec(site.name, dtype, site.shape, row_axis, encoded, restore=restore)
            decoder = build_blocked_matmul(spec, reader, boundaries, context.names, context.pool)
            function = BLOCKED_MATMUL
            gate = (f"blocked MatMul: decoded in {len(boundaries) - 1} column blocks, one at a time"
                    if len(boundaries) > 2 else reader.input[0])
        elif is_lone_table_gather(site, row_axis):
            spec = DecodeSpec(reader.output[0], dtype, site.shape, row_axis, encoded, gather_indices=reader.input[1],
                              restore=restore)
            decoder, function = build_decoder(spec, context.names, context.pool, gate=None), DECODE_ROWS
            gate = row_decoded(reader.input[1])
        else:
            spec = DecodeSpec(site.name, dtype, site.shape, row_axis, encoded, restore=restore)
            activation = next((n for n in reader.input if n and n not in context.constants), None)
            if activation is None:
                activation = next((v.name for v in site.graph.input if v.name not in context.constants), None)
            decoder = build_weight_decoder(spec, context.names, context.pool,
                                           gate=None if activation is None else GATE_PLACEHOLDER)
            function = DECODE_WEIGHT
            gate = activation or "none: no run-time input before the first consumer, onnxruntime may fold the decoder"
        learned = f", learned ({self.learning(context.config)})" if encoding.learned else ""
        record = dict(bits=encoded.bits, groups=len(encoded.group_sizes), encoding=self.describe(encoded) + learned,
                      outliers=int(encoded.outlier_index.size), decode_gate=gate)
        return WrittenDecoder(decoder, activation, function != DECODE_WEIGHT, function, record)

    def _write_tied(self, site: WeightSite, encoding: SiteEncoding, context: DecoderContext) -> WrittenDecoder:
        """A table E [V, D] read by an embedding Gather and, transposed, by a head MatMul: a row decoder in the
        Gather's place, and in the head's a blocked head (at most :data:`MAX_COLUMN_BLOCKS` blocks of rows, each
        looked up by a row decoder and multiplied in turn); both read the one copy of the stored tensors, and the
        head's Transpose goes, so no run decodes (or transposes) the whole table."""
        encoded, restore, dtype = encoding.encoded, encoding.restore, site.tensor.data_type
        gather = next(consumer for consumer in site.consumers if consumer.node.op_type == "Gather")
        transpose, head = tied_head(site)
        shared: dict[str, str] = {}
        rows_spec = DecodeSpec(gather.node.output[0], dtype, site.shape, 0, encoded,
                               gather_indices=gather.node.input[1], restore=restore)
        rows_decoder = build_decoder(rows_spec, context.names, context.pool, None, shared)
        vocabulary = site.shape[0]
        blocks = -(-site.num_elements // column_block_weights(site.num_elements))
        bounds = sorted({round(b) for b in np.linspace(0, vocabulary, blocks + 1)})
        head_spec = DecodeSpec(head.node.output[0], dtype, site.shape, 0, encoded, restore=restore)
        head_decoder = build_tied_head(head_spec, head.node, bounds, context.names, context.pool, shared)
        learned = f", learned ({self.learning(context.config)})" if encoding.learned else ""
        gate = (f"{row_decoded(gather.node.input[1])}; the tied head {head.describe()}: decoded in "
                f"{len(bounds) - 1} blocks of rows, one at a time")
        record = dict(bits=encoded.bits, groups=len(encoded.group_sizes), encoding=self.describe(encoded) + learned,
                      outliers=int(encoded.outlier_index.size), decode_gate=gate)
        head_written = WrittenDecoder(head_decoder, None, True, BLOCKED_MATMUL, {}, at_node=head.node_index,
                                      drops=(transpose.node_index,))
        return WrittenDecoder(rows_decoder, None, True, DECODE_ROWS, record, at_node=gather.node_index,
                              more=(head_written,))


class MultiCodebook(CodebookFormat):
    """A codebook per group of rows (per row by default): ``W^[r, j] = C[g(r), I[r, j]]``."""

    name = "multi-codebook"

    def selects(self, site: WeightSite, row_axis: int, config: CompressionConfig) -> bool:
        return config.encoding == self.name and config.codebook_block_size is None

    def squared_errors(self, sample: np.ndarray, bit_widths: list[int], sizes: tuple[int, ...], dtype: np.dtype,
                       config: CompressionConfig, iterations: int) -> dict[int, float]:
        """Read off each group's sorted weights (:func:`~jlcm_onnx.encodings.codebook.codebook_errors`): no
        encoding is built."""
        return codebook_errors(sample, bit_widths, sizes, dtype, iterations, config.outlier_fraction)


class InputBlocks(CodebookFormat):
    """A codebook per group of rows and a scale and an offset per block of inputs of each row:
    ``W^[r, j] = s[r, j / B] * C[g(r), I[r, j]] + o[r, j / B]``."""

    name = "multi-codebook"

    def selects(self, site: WeightSite, row_axis: int, config: CompressionConfig) -> bool:
        return config.codebook_block_size is not None

    def describe(self, encoded: EncodedMatrix) -> str:
        return f"{self.name}, input blocks of {encoded.block_size}"


class MultiScaling(CodebookFormat):
    """One codebook shared by all groups, scaled per group: ``W^[r, j] = s[g(r)] * c[I[r, j]]``. The shared
    codebook is fitted to, and learned on, the whole tensor at once."""

    name = "multi-scaling"
    fits_whole_tensor = True
    learns_whole_tensor = True

    def selects(self, site: WeightSite, row_axis: int, config: CompressionConfig) -> bool:
        return config.encoding == self.name

    def _fit(self, matrix: np.ndarray, bits: int, sizes: tuple[int, ...], dtype: np.dtype, config: CompressionConfig,
             iterations: int, **options: Any) -> EncodedMatrix:
        return encode_scaled_matrix(matrix, bits, sizes, dtype, iterations, **options)

    def _stand_in_fields(self, fields: dict[str, Any], rows: int, cols: int, request: EncodeRequest,
                         config: CompressionConfig) -> dict[str, Any]:
        entries, groups = 1 << request.bits, len(request.group_sizes)
        return fields | dict(codebooks=np.zeros((groups, entries), np.float32),
                             scales=np.zeros(groups, request.dtype), shared_codebook=np.zeros(entries, request.dtype))

    def _codebook_bytes(self, shape: WeightShape, entries: int, groups: int) -> int:
        return shape.codebook_bytes * (entries + groups)


def row_decoded(indices: str) -> str:
    """The report's decode-gate words for a row decoder."""
    return f"row decoder: only the rows picked by '{indices}' are decoded"
