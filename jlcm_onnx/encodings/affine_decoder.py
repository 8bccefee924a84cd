"""The decoder of an affine-blocks weight (:mod:`jlcm_onnx.encodings.affine_blocks`): standard ``DequantizeLinear``.

*Fused layout*, for the B input [K, N] of a MatMul or of a Gemm (rows = the N outputs, last)::

    W = DequantizeLinear(q [K, N], s [ceil(K / B), N], z [ceil(K / B), N], axis=0, block_size=B)

with ``q`` and ``z`` stored as ONNX UINT4 (UINT2, UINT8) at b bits each. onnxruntime rewrites this into its fused
``MatMulNBits`` kernel at load (b in {2, 4, 8}, B a power of 2 >= 16): the weight stays b-bit in memory, and the
product runs faster than the dense one. Scales stored in float16 for a float32 weight are ``Cast`` first; the Cast of
an initializer is folded at load, before the fusion. A Gemm that reads its B transposed (``transB=1``, W [N, K]) is
replaced by the same Gemm with ``transB=0`` reading the decoded ``W^T``, so it is fused too.

*Unpacked layout*, for every other consumer (Conv, ConvTranspose, a weight with several readers)::

    q = unpack(packed)                                  uint8 [rows, cols], from b-bit words (encodings.packing)
    W = Reshape/Transpose(DequantizeLinear(q, s [rows, nb], z [rows, nb], axis=1, block_size=B))

onnxruntime folds the unpacking at load (its inputs are initializers) into a uint8 tensor, but never folds
``DequantizeLinear``: the weight stays one byte per weight in memory and is dequantised by a vectorised kernel on
each run. Only uint8 tensors are stored, which the mobile ``.ort`` format can hold (it cannot hold a UINT4 tensor
that is not fused into MatMulNBits).

*Float offsets* (``W^ = s q + o`` per block, :mod:`jlcm_onnx.encodings.affine_blocks`) are carried exactly with
standard ops. A lone MatMul ``Y = X W`` (K a multiple of B) is replaced by the fused product with ``z = 0`` plus the
offsets' share, which only needs the sums of X over each block of B inputs::

    Y = MatMul(X, DequantizeLinear(q, s)) + MatMul(ReduceSum(Reshape(X, [..., K / B, B]), -1), o)     o [K / B, N]

(an extra product 1/B the size of the layer's). In the unpacked layout ``o`` is added to the dequantised blocks; a
Gemm keeps integer zero points (its fused form has no place for the offsets' share).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from jlcm_onnx.encodings.affine_blocks import AffineBlocks
from jlcm_onnx.encodings.codebook_decoder import DecodeGraph, DecoderBuilder, DecodeSpec, finish_layout, unpack_codes
from jlcm_onnx.encodings.packing import WordLayout, pack_codes
from jlcm_onnx.ir.graph_building import ConstantPool, NameAllocator

#: ONNX types of the stored codes and zero points of the fused layout, by bits.
FUSED_TYPES = {2: onnx.TensorProto.UINT2, 4: onnx.TensorProto.UINT4, 8: onnx.TensorProto.UINT8}
#: The ai.onnx opset that introduced blocked DequantizeLinear (and UINT4), and the one that introduced UINT2.
BLOCKED_DQ_OPSET, UINT2_OPSET = 21, 25


def required_opset(bits: int) -> int:
    """The least ai.onnx opset whose DequantizeLinear reads ``bits``-bit codes of the fused layout."""
    return UINT2_OPSET if bits == 2 else BLOCKED_DQ_OPSET


def required_ir_version(bits: int) -> int:
    """The least IR version that holds the fused layout's tensor types (UINT4: 10, UINT2: 11)."""
    return 11 if bits == 2 else 10


#: Bytes packed at once by :func:`pack_sub_byte`.
PACK_CHUNK_BYTES = 1 << 22


def pack_sub_byte(values: np.ndarray, bits: int) -> bytes:
    """ONNX raw data of a UINT2/UINT4 tensor: element i in bits ``[(i % L) b, (i % L + 1) b)`` of byte ``i // L``,
    ``L = 8 / b`` (the onnx layout); UINT8 as it is."""
    flat = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    per_byte = 8 // bits
    packed = np.empty(-(-flat.size // per_byte), np.uint8)
    shifts = (bits * np.arange(per_byte)).astype(np.uint8)
    step = PACK_CHUNK_BYTES
    for first in range(0, packed.size, step):  # a run of bytes at a time: the work is a few bytes per code
        part = flat[first * per_byte:(first + step) * per_byte]
        padded = np.zeros(-(-part.size // per_byte) * per_byte, np.uint8)
        padded[:part.size] = part
        packed[first:first + padded.size // per_byte] = np.bitwise_or.reduce(
            padded.reshape(-1, per_byte) << shifts, axis=1)
    return packed.tobytes()


def build_fused_decoder(spec: DecodeSpec, names: NameAllocator, pool: ConstantPool) -> DecodeGraph:
    """``spec.output`` = W [K, N] (rows last) from q, s, z in the fused layout (integer zero points only)."""
    b = DecoderBuilder(spec, names, pool)
    _fused_dequantize(b, spec, spec.output)
    return DecodeGraph(b.nodes, b.initializers)


def build_offset_matmul(spec: DecodeSpec, matmul: onnx.NodeProto, names: NameAllocator,
                        pool: ConstantPool) -> DecodeGraph:
    """Stands in for ``Y = MatMul(X, W)`` with W in affine blocks with float offsets (see the module docstring)."""
    b = DecoderBuilder(spec, names, pool)
    encoded: AffineBlocks = spec.encoded
    activation, output = matmul.input[0], matmul.output[0]
    main = b.op("MatMul", [activation, _fused_dequantize(b, spec, None)])
    leading = b.op("Slice", [b.op("Shape", [activation]), b.shape([0]), b.shape([-1])])
    count = encoded.scales.shape[1]
    blocked = b.op("Reshape", [activation, b.op("Concat", [leading, b.shape([count, encoded.block_size])], axis=0)])
    sums = b.op("ReduceSum", [blocked, b.shape([-1])], keepdims=0)
    shares = b.op("MatMul", [sums, _cast(b, spec, b.stored("offsets", np.ascontiguousarray(encoded.offsets.T)))])
    b.op("Add", [main, shares], output)
    return DecodeGraph(b.nodes, b.initializers)


def _fused_dequantize(b: DecoderBuilder, spec: DecodeSpec, output: str | None) -> str:
    """DequantizeLinear of the codes stored [K, N] at b bits (zero points only without float offsets)."""
    encoded: AffineBlocks = spec.encoded
    data_type = FUSED_TYPES[encoded.bits]
    inputs = [_stored_raw(b, "codes", data_type, encoded.codes.T), _scales(b, spec, encoded.scales.T)]
    if encoded.offsets is None:
        inputs.append(_stored_raw(b, "zero_points", data_type, encoded.zero_points.T))
    return b.op("DequantizeLinear", inputs, output, axis=0, block_size=encoded.block_size)


def build_transposed_gemm(spec: DecodeSpec, gemm: onnx.NodeProto, names: NameAllocator,
                          pool: ConstantPool) -> DecodeGraph:
    """Stands in for ``Gemm(A, W, C, transB=1)``: ``Gemm(A, W^T, C, transB=0)`` with W^T from the fused layout."""
    transposed = names.fresh(f"{spec.output}.jlcm_transposed")
    decoder = build_fused_decoder(DecodeSpec(transposed, spec.dtype, spec.shape[::-1], 1, spec.encoded), names,
                                  pool)
    replacement = onnx.NodeProto()
    replacement.CopyFrom(gemm)
    replacement.input[1] = transposed
    for attribute in replacement.attribute:
        if attribute.name == "transB":
            attribute.i = 0
    return DecodeGraph([*decoder.nodes, replacement], decoder.initializers)


def build_unpacked_decoder(spec: DecodeSpec, names: NameAllocator, pool: ConstantPool) -> DecodeGraph:
    """``spec.output`` in W's layout from b-bit words unpacked to uint8, a DequantizeLinear along the inputs, and
    the float offsets, if any."""
    b = DecoderBuilder(spec, names, pool)
    encoded: AffineBlocks = spec.encoded
    layout = WordLayout(encoded.bits)
    unpacked = []
    stored = [("codes", encoded.codes)] + ([("zero_points", encoded.zero_points)] if encoded.offsets is None else [])
    for part, array in stored:
        packed = b.stored(part, pack_codes(array.reshape(-1), layout.bits))
        flat = unpack_codes(b, packed, layout, array.size, rows=None, to=onnx.TensorProto.UINT8)
        unpacked.append(b.op("Reshape", [flat, b.shape(array.shape)]))
    scales = _scales(b, spec, encoded.scales)
    decoded = b.op("DequantizeLinear", [unpacked[0], scales, *unpacked[1:]], axis=1, block_size=encoded.block_size)
    if encoded.offsets is not None:
        decoded = _add_offsets(b, spec, decoded)
    others = [i for i in range(len(spec.shape)) if i != spec.row_axis]
    moved_shape = tuple(spec.shape[i] for i in [spec.row_axis, *others])
    perm = None if spec.row_axis == 0 else [int(i) for i in np.argsort([spec.row_axis, *others])]
    finish_layout(b, decoded, moved_shape, perm)
    return DecodeGraph(b.nodes, b.initializers)


def _add_offsets(b: DecoderBuilder, spec: DecodeSpec, decoded: str) -> str:
    """``decoded`` [rows, cols] plus each block's float offset (padded to whole blocks and back when B does not
    divide cols)."""
    encoded: AffineBlocks = spec.encoded
    rows, cols = encoded.codes.shape
    count, size = encoded.offsets.shape[1], encoded.block_size
    pad = count * size - cols
    if pad:
        decoded = b.op("Pad", [decoded, b.shape([0, 0, 0, pad])])
    offsets = _cast(b, spec, b.stored("offsets", encoded.offsets.reshape(rows, count, 1)))
    shifted = b.op("Add", [b.op("Reshape", [decoded, b.shape([rows, count, size])]), offsets])
    flat = b.op("Reshape", [shifted, b.shape([rows, count * size])])
    return b.op("Slice", [flat, b.shape([0]), b.shape([cols]), b.shape([1])]) if pad else flat


def _stored_raw(b: DecoderBuilder, suffix: str, data_type: int, array: np.ndarray) -> str:
    name = b.names.fresh(f"{b.spec.output}.jlcm_{suffix}")
    b.initializers.append(helper.make_tensor(name, data_type, array.shape, pack_sub_byte(array, _bits(data_type)),
                                             raw=True))
    return name


def _bits(data_type: int) -> int:
    return next(bits for bits, kind in FUSED_TYPES.items() if kind == data_type)


def _scales(b: DecoderBuilder, spec: DecodeSpec, scales: np.ndarray) -> str:
    return _cast(b, spec, b.stored("scales", np.ascontiguousarray(scales)))


def _cast(b: DecoderBuilder, spec: DecodeSpec, stored: str) -> str:
    """A stored tensor cast to the weight's type when stored narrower (a Cast onnxruntime folds at load)."""
    data_type = next(t.data_type for t in b.initializers if t.name == stored)
    return stored if data_type == spec.dtype else b.op("Cast", [stored], to=spec.dtype)
