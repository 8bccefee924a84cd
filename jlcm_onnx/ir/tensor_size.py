"""Sizes of tensors read from their shapes, never by serializing them.

With the upb protobuf backend, ``TensorProto.ByteSize()`` encodes the message into a growing buffer (twice a large
tensor's size, transiently) and every read of ``raw_data`` copies it into a new ``bytes`` object; on a 671 MB embedding
table either costs more memory than the encoder that follows. A tensor's element count and type give its stored size
exactly: ``raw_data`` holds the little-endian elements, sub-byte types (4- and 2-bit) packed with the last byte padded.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

#: Element widths in bits of the types packed below one byte.
SUB_BYTE_BITS = {
    onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4, onnx.TensorProto.FLOAT4E2M1: 4,
    **{getattr(onnx.TensorProto, name): 2 for name in ("UINT2", "INT2") if hasattr(onnx.TensorProto, name)},
}


def element_count(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of ``tensor``'s data as stored: sub-byte types packed, strings as the sum of their lengths."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(value) for value in tensor.string_data)
    bits = SUB_BYTE_BITS.get(tensor.data_type)
    if bits is not None:
        return math.ceil(element_count(tensor) * bits / 8)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except KeyError:  # an undefined or unknown type: no shape rule, only its serialized size
        return tensor.ByteSize()
    return element_count(tensor) * itemsize
