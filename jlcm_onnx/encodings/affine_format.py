"""The affine-blocks format of ``speed="fast"``: uniform b-bit levels with a scale and a zero point (or a float
offset) per block of B inputs (:mod:`jlcm_onnx.encodings.affine_blocks`), written so that stock onnxruntime runs its
fused or vectorised kernels (:mod:`jlcm_onnx.encodings.affine_decoder`).

It takes every weight under ``speed="fast"`` except a table read by one Gather, which keeps per-row codebooks unless
float offsets are asked for (either way its row decoder decodes only the looked-up rows). Rows are never re-ordered:
blocks run along the inputs. Each weight is written in the layout its reader allows (:func:`layout`)::

    fused            the B of a lone MatMul or Gemm: DequantizeLinear, fused into MatMulNBits at load
    transposed gemm  a lone Gemm with transB=1, rewritten to read the dequantised weight untransposed
    offset matmul    a lone MatMul with float offsets: the fused form plus a small MatMul of the block sums
    row decoder      a table read by one Gather: the codebook row decoder over the grid and the blocks
    unpacked         any other reader: DequantizeLinear on uint8 codes, dequantised each run
    folded           the same with decode_at_load: the codebook decoder without a gate, folded at load
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.affine_blocks import AffineBlocks, fit_affine_blocks, learn_affine_blocks
from jlcm_onnx.encodings.affine_decoder import (
    build_fused_decoder,
    build_offset_matmul,
    build_transposed_gemm,
    build_unpacked_decoder,
    pack_sub_byte,
    required_ir_version,
    required_opset,
)
from jlcm_onnx.encodings.base import (
    DecoderContext,
    EncodeRequest,
    Encoding,
    SiteEncoding,
    WeightShape,
    WrittenDecoder,
)
from jlcm_onnx.encodings.codebook_decoder import DecodeGraph, DecodeSpec, build_decoder
from jlcm_onnx.encodings.codebook_formats import row_decoded
from jlcm_onnx.ir.decoder_functions import DECODE_ROWS, DECODE_WEIGHT
from jlcm_onnx.ir.weight_sites import WeightSite, anchor_index, is_lone_matrix_input, is_lone_table_gather

#: How a weight runs, for the report.
FUSED = "none needed: DequantizeLinear, fused with its reader into MatMulNBits by onnxruntime"
UNPACKED = "none needed: DequantizeLinear on uint8 codes (unpacked at load) each run"
FOLDED = "none: decoded once at load (decode_at_load): dense speed and memory for this weight"
#: Layouts whose decoder stands in for the reader node (a rewritten Gemm, a MatMul plus its offsets' share, the
#: Gather of a table decoded row by row).
REWRITTEN = ("transposed gemm", "offset matmul", "row decoder")


def layout(site: WeightSite, row_axis: int, config: CompressionConfig) -> str:
    """How ``site`` is written (see the module docstring)."""
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


def has_float_offsets(written_as: str, config: CompressionConfig) -> bool:
    """Whether a weight written in layout ``written_as`` stores float offsets: asked for, and a layout that carries
    them; always when folded at load (the codebook decoder stores offsets in the codebook dtype, which ``-s z`` may
    not fit)."""
    return written_as == "folded" or (config.affine_offsets == "float"
                                      and written_as in ("offset matmul", "row decoder", "unpacked"))


class AffineBlocksFormat(Encoding):
    """Uniform levels with a scale and a zero point (or float offset) per block of inputs:
    ``W^[r, j] = s[r, j / B] * (q[r, j] - z[r, j / B])``."""

    groups_rows: ClassVar[bool] = False

    def model_needs(self, config: CompressionConfig) -> tuple[int, int]:
        """Blocked DequantizeLinear and the codes' types: opset 21 and IR 10 (UINT4, UINT8), opset 25 and IR 11 with
        2-bit weights anywhere (the config's bits or an override's)."""
        if not config.fuses_any:
            return 0, 0
        bits = {config.bits, *(override["bits"] for override in config.overrides if "bits" in override)}
        return max(required_opset(b) for b in bits), max(required_ir_version(b) for b in bits)

    def selects(self, site: WeightSite, row_axis: int, config: CompressionConfig) -> bool:
        """For a weight of speed 'fast' (the run's, or its own: :meth:`~jlcm_onnx.config.CompressionConfig.
        tensor_speed`), in a model whose opset holds blocked DequantizeLinear (it was raised, or could not be)."""
        speed = config.tensor_speed(site.name, {consumer.node.op_type for consumer in site.consumers})
        if speed != "fast" or site.opset < self.model_needs(config)[0]:
            return False
        return config.affine_offsets == "float" or not is_lone_table_gather(site, row_axis)

    def fit_options(self, site: WeightSite, row_axis: int, config: CompressionConfig) -> dict[str, Any]:
        return {"float_offsets": has_float_offsets(layout(site, row_axis, config), config)}

    def encode(self, matrix: np.ndarray, request: EncodeRequest, config: CompressionConfig) -> AffineBlocks:
        return fit_affine_blocks(matrix, request.bits, config.affine_block_size, request.dtype, request.importance,
                                 float_offsets=request.fit_options["float_offsets"],
                                 chunk_weights=request.chunk_weights)

    def learn(self, matrix: np.ndarray, encoded: AffineBlocks, gram: np.ndarray, config: CompressionConfig,
              device: str) -> tuple[AffineBlocks, float]:
        return learn_affine_blocks(matrix, encoded, gram)

    def stand_in(self, rows: int, cols: int, request: EncodeRequest, site: WeightSite, row_axis: int,
                 config: CompressionConfig) -> AffineBlocks:
        blocks = (rows, -(-cols // config.affine_block_size))
        offsets = np.zeros(blocks, request.dtype) if has_float_offsets(layout(site, row_axis, config), config) else None
        return AffineBlocks(np.zeros((rows, cols), np.uint8), np.zeros(blocks, request.dtype),
                            np.zeros(blocks, np.uint8), config.affine_block_size, request.bits, offsets)

    def stored_bytes(self, shape: WeightShape, bits: int, groups: int, outlier_fraction: float,
                     config: CompressionConfig) -> int:
        """Codes at b bits, and per block a scale and a b-bit zero point (the fused layout)."""
        cols = shape.size // shape.rows
        blocks = shape.rows * -(-cols // config.affine_block_size)
        codes = len(pack_sub_byte(np.zeros(shape.size, np.uint8), bits)) if bits < 8 else shape.size
        return codes + blocks * shape.codebook_bytes + -(-blocks * bits // 8)

    def squared_errors(self, sample: np.ndarray, bit_widths: list[int], sizes: tuple[int, ...], dtype: np.dtype,
                       config: CompressionConfig, iterations: int) -> dict[int, float]:
        errors = {}
        for bits in bit_widths:
            encoded = fit_affine_blocks(sample, bits, config.affine_block_size, dtype)
            errors[bits] = float(np.sum((encoded.decode().astype(np.float64) - sample) ** 2))
        return errors

    def write(self, site: WeightSite, row_axis: int, encoding: SiteEncoding, context: DecoderContext) -> WrittenDecoder:
        encoded: AffineBlocks = encoding.encoded
        written_as = layout(site, row_axis, context.config)
        reader = site.graph.node[anchor_index(site)]
        decoder = _decoder(site, row_axis, encoded, written_as, context)
        runtime = {"unpacked": UNPACKED, "folded": FOLDED, "row decoder": row_decoded(reader.input[1])}.get(
            written_as, FUSED)
        offsets = encoded.offsets is not None
        learned = (f", learned (error-feedback codes, closed-form scales{' and offsets' if offsets else ''})"
                   if encoding.learned else "")
        record = dict(bits=encoded.bits, outliers=0, decode_gate=runtime,
                      encoding=f"affine blocks of {encoded.block_size}{', float offsets' if offsets else ''}{learned}")
        function = {"row decoder": DECODE_ROWS, "folded": DECODE_WEIGHT, "unpacked": DECODE_WEIGHT}.get(written_as)
        return WrittenDecoder(decoder, None, written_as in REWRITTEN, function, record)


def _decoder(site: WeightSite, row_axis: int, encoded: AffineBlocks, written_as: str,
             context: DecoderContext) -> DecodeGraph:
    """The decoder of ``site`` in layout ``written_as``."""
    names, pool = context.names, context.pool
    dtype = site.tensor.data_type
    reader = site.graph.node[anchor_index(site)]
    spec = DecodeSpec(site.name, dtype, site.shape, row_axis, encoded)
    if written_as == "row decoder":
        rows = DecodeSpec(reader.output[0], dtype, site.shape, row_axis, encoded.as_codebook_encoding(),
                          gather_indices=reader.input[1])
        return build_decoder(rows, names, pool, gate=None)
    if written_as == "folded":
        whole = DecodeSpec(site.name, dtype, site.shape, row_axis, encoded.as_codebook_encoding())
        return build_decoder(whole, names, pool, gate=None)
    if written_as == "transposed gemm":
        return build_transposed_gemm(spec, reader, names, pool)
    if written_as == "offset matmul":
        return build_offset_matmul(spec, reader, names, pool)
    if written_as == "unpacked":
        return build_unpacked_decoder(spec, names, pool)
    return build_fused_decoder(spec, names, pool)
