"""The decoder of an affine-blocks weight (:mod:`jlcm_onnx.encodings.affine_blocks`): standard ``DequantizeLinear``.

*Fused layout*, for the B input [K, N] of a MatMul or of a Gemm (rows = the N outputs, last)::

    W = DequantizeLinear(q [K, N], s [ceil(K / B), N], z [ceil(K / B), N], axis=0, block_size=B)

with ``q`` and ``z`` stored as ONNX UINT4 (UINT2, UINT8) at b bits each. onnxruntime rewrites this into its fused
``MatMulNBits`` kernel at load (b in {2, 4, 8}, B a power of 2 >= 16): the weight stays b-bit in memory, and the
product runs faster than the dense one. Scales stored in float16 for a float32 weight are ``Cast`` first; the Cast of
an initializer is folded at load, before the fusion. A Gemm that reads its B transposed (``transB=1``, W [N, K]) is
replaced by the same Gemm with ``transB=0`` reading the decoded ``W^T``, so it is fused too.

*Unpacked layout*, for every other consumer (Conv, ConvTranspose, a weight with several readers)::

    q = unpack(packed)                                  uint8 [rows, cols], from b-bit words (jlcm_onnx.packing)
    W = Reshape/Transpose(DequantizeLinear(q, s [rows, nb], z [rows, nb], axis=1, block_size=B))

onnxruntime folds the unpacking at load (its inputs are initializers) into a uint8 tensor, but never folds
``DequantizeLinear``: the weight stays one byte per weight in memory and is dequantised by a vectorised kernel on
each run. Only uint8 tensors are stored, which the mobile ``.ort`` format can hold (it cannot hold a UINT4 tensor
that is not fused into MatMulNBits).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from jlcm_onnx.encodings.affine_blocks import AffineBlocks
from jlcm_onnx.packing import WordLayout, pack_codes
from jlcm_onnx.passes.dequant_graph import (
    ConstantPool,
    DecodeGraph,
    DecoderBuilder,
    DecodeSpec,
    NameAllocator,
    finish_layout,
    unpack_codes,
)

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


def pack_sub_byte(values: np.ndarray, bits: int) -> bytes:
    """ONNX raw data of a UINT2/UINT4 tensor: element i in bits ``[(i % L) b, (i % L + 1) b)`` of byte ``i // L``,
    ``L = 8 / b`` (the onnx layout); UINT8 as it is."""
    flat = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    per_byte = 8 // bits
    padded = np.zeros(-(-flat.size // per_byte) * per_byte, np.uint8)
    padded[:flat.size] = flat
    slots = padded.reshape(-1, per_byte).astype(np.uint16) << (bits * np.arange(per_byte, dtype=np.uint16))
    return slots.sum(axis=1).astype(np.uint8).tobytes()


def build_fused_decoder(spec: DecodeSpec, names: NameAllocator, pool: ConstantPool) -> DecodeGraph:
    """``spec.output`` = W [K, N] (rows last) from q, s, z in the fused layout."""
    b = DecoderBuilder(spec, names, pool)
    encoded: AffineBlocks = spec.encoded
    data_type = FUSED_TYPES[encoded.bits]
    codes = _stored_raw(b, "codes", data_type, encoded.codes.T)
    zero_points = _stored_raw(b, "zero_points", data_type, encoded.zero_points.T)
    scales = _scales(b, spec, encoded.scales.T)
    b.op("DequantizeLinear", [codes, scales, zero_points], spec.output, axis=0, block_size=encoded.block_size)
    return DecodeGraph(b.nodes, b.initializers)


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
    """``spec.output`` in W's layout from b-bit words unpacked to uint8 and a DequantizeLinear along the inputs."""
    b = DecoderBuilder(spec, names, pool)
    encoded: AffineBlocks = spec.encoded
    layout = WordLayout(encoded.bits)
    unpacked = []
    for part, array in (("codes", encoded.codes), ("zero_points", encoded.zero_points)):
        packed = b.stored(part, pack_codes(array.reshape(-1), layout.bits))
        flat = unpack_codes(b, packed, layout, array.size, rows=None, to=onnx.TensorProto.UINT8)
        unpacked.append(b.op("Reshape", [flat, b.shape(array.shape)]))
    scales = _scales(b, spec, encoded.scales)
    decoded = b.op("DequantizeLinear", [unpacked[0], scales, unpacked[1]], axis=1, block_size=encoded.block_size)
    others = [i for i in range(len(spec.shape)) if i != spec.row_axis]
    moved_shape = tuple(spec.shape[i] for i in [spec.row_axis, *others])
    perm = None if spec.row_axis == 0 else [int(i) for i in np.argsort([spec.row_axis, *others])]
    finish_layout(b, decoded, moved_shape, perm)
    return DecodeGraph(b.nodes, b.initializers)


def _stored_raw(b: DecoderBuilder, suffix: str, data_type: int, array: np.ndarray) -> str:
    name = b.names.fresh(f"{b.spec.output}.jlcm_{suffix}")
    b.initializers.append(helper.make_tensor(name, data_type, array.shape, pack_sub_byte(array, _bits(data_type)),
                                             raw=True))
    return name


def _bits(data_type: int) -> int:
    return next(bits for bits, kind in FUSED_TYPES.items() if kind == data_type)


def _scales(b: DecoderBuilder, spec: DecodeSpec, scales: np.ndarray) -> str:
    """The stored scales, cast to the weight's type when stored narrower (a Cast onnxruntime folds at load)."""
    name = b.stored("scales", np.ascontiguousarray(scales))
    if helper.np_dtype_to_tensor_dtype(scales.dtype) != spec.dtype:
        name = b.op("Cast", [name], to=spec.dtype)
    return name
