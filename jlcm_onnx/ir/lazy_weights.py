"""Large weights left in their file until they are read, and then memory-mapped rather than copied.

``onnx.load`` of a 1 GB model holds the file's bytes and the parsed message at once (2.2 GB), and every later read of
a tensor (``numpy_helper.to_array``) copies it once more. Here a model is read as its structure plus, for each large
tensor, where its bytes lie: the message keeps such a tensor's type and shape, with ``data_location = EXTERNAL`` and
``external_data`` = {``location``: the absolute path of the file holding it, ``offset``, ``length``}. That file is
the model file itself for embedded weights (a tensor's ``raw_data`` is its little-endian elements, stored contiguously
inside the protobuf encoding, so its byte range is found by walking the wire format) or the model's own external-data
file. Only tensors above :data:`LAZY_MIN_BYTES` of a type numpy maps natively are left in place; the rest are read.

:func:`tensor_array` gives a lazy tensor as a read-only ``numpy.memmap``: pages are read on first touch, belong to the
page cache, and leave the process once the array is dropped. :func:`materialize` reads every lazy tensor into its
message, for anything that serializes the model (checks, sessions from bytes, the written output).

An absolute location is what marks a tensor as lazy: a model read from disk never carries one (they are refused on
input, see :func:`jlcm_onnx.ir.model_load.check_external_locations`), and lazy tensors never leave the process.

Wire format (protobuf): a field is a varint key ``number << 3 | wire_type`` then its value: a varint (type 0), 8 bytes
(1), a varint length and that many bytes (2), or 4 bytes (5). The path walked is ``ModelProto.graph`` (7) ->
``GraphProto.initializer`` (5) -> ``TensorProto.raw_data`` (9); everything else is copied through unread.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from jlcm_onnx.ir.tensor_size import stored_bytes

#: Tensors at least this large are left in their file; smaller ones (shapes, norms, biases) are read at once.
LAZY_MIN_BYTES = 1 << 16

_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_RAW_DATA = 1, 2, 9
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_NATIVE_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
})


class WireFormatError(ValueError):
    """The file is not a protobuf message this reader can walk (truncated, or a field of an unknown wire type)."""


@dataclass(frozen=True)
class _Field:
    number: int
    start: int  # the field's key
    value: int  # its value (after the length, for length-delimited fields)
    end: int


def read_structure(path: Path) -> tuple[onnx.ModelProto, dict[int, tuple[int, int]]]:
    """(the model at ``path`` without its large embedded payloads, {main-graph initializer index: (offset, length) of
    its payload in the file}); :func:`defer_payloads` then points the tensors at them. Raises :class:`WireFormatError`
    or ``google.protobuf.message.DecodeError`` when the file is not a model."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        structure, payloads = _without_large_payloads(data)
    model = onnx.ModelProto()
    model.ParseFromString(structure)
    return model, payloads


def defer_payloads(model: onnx.ModelProto, path: Path, payloads: dict[int, tuple[int, int]]) -> None:
    """Makes the initializers of :func:`read_structure`'s ``payloads`` lazy references into the file at ``path``."""
    location = str(path.resolve())
    for index, (offset, length) in payloads.items():
        _refer(model.graph.initializer[index], location, offset, length)


def defer_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Reads the external data of ``model`` (locations already checked to lie in ``folder``): large main-graph
    initializers of native types become lazy references to their files, every other tensor is read into its message."""
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor) and not is_lazy(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            path = folder / info.location
            offset, size = info.offset or 0, path.stat().st_size  # a missing file raises here, not when read
            length = info.length if info.length is not None else size - offset
            if offset + length > size:
                raise ValueError(f"tensor '{tensor.name}' needs bytes {offset}..{offset + length} of "
                                 f"'{info.location}', which has {size}")
            if tensor.data_type in _NATIVE_TYPES and length >= LAZY_MIN_BYTES and length == stored_bytes(tensor):
                _refer(tensor, str(path.resolve()), offset, length)
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor) and not is_lazy(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def is_lazy(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and os.path.isabs(lazy_location(tensor))


def lazy_location(tensor: onnx.TensorProto) -> str:
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """``tensor``'s values: a read-only memory map of a lazy tensor, else ``numpy_helper.to_array``."""
    if not is_lazy(tensor):
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    shape = tuple(tensor.dims)
    if not shape or 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(info["location"], dtype=dtype, mode="r", offset=int(info["offset"]), shape=shape)


def materialize(model: onnx.ModelProto) -> None:
    """Reads every lazy tensor of ``model`` into its message (in place)."""
    for tensor in external_data_helper._get_all_tensors(model):
        if is_lazy(tensor):
            info = {entry.key: entry.value for entry in tensor.external_data}
            with open(info["location"], "rb") as file:
                file.seek(int(info["offset"]))
                tensor.raw_data = file.read(int(info["length"]))
            tensor.ClearField("data_location")  # as it was in the file: not even set to DEFAULT
            del tensor.external_data[:]


# ------------------------------------------------------------------------------------------------------ wire format


def _without_large_payloads(data: mmap.mmap) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """(the model's bytes without the large ``raw_data`` of its main graph's initializers, {initializer index:
    (offset, length) of the payload in ``data``})."""
    parts, spans = [], {}
    graphs = 0
    for field in _fields(data, 0, len(data)):
        if field.number != _MODEL_GRAPH or graphs:
            parts.append(data[field.start:field.end])
            continue
        graphs += 1
        graph, spans = _graph_without_payloads(data, field)
        parts.append(_key(_MODEL_GRAPH) + _varint(len(graph)) + graph)
    return b"".join(parts), spans


def _graph_without_payloads(data: mmap.mmap, graph: _Field) -> tuple[bytes, dict[int, tuple[int, int]]]:
    parts, spans = [], {}
    index = 0
    for field in _fields(data, graph.value, graph.end):
        if field.number != _GRAPH_INITIALIZER:
            parts.append(data[field.start:field.end])
            continue
        payload = _large_payload(data, field)
        if payload is None:
            parts.append(data[field.start:field.end])
        else:
            tensor = data[field.value:payload.start] + data[payload.end:field.end]
            parts.append(_key(_GRAPH_INITIALIZER) + _varint(len(tensor)) + tensor)
            spans[index] = (payload.value, payload.end - payload.value)
        index += 1
    return b"".join(parts), spans


def _large_payload(data: mmap.mmap, tensor: _Field) -> _Field | None:
    """The ``raw_data`` field of an initializer worth leaving in the file (native type, large, exactly its shape's
    bytes), or None."""
    payload, data_type, dims = None, None, []
    for field in _fields(data, tensor.value, tensor.end):
        if field.number == _TENSOR_RAW_DATA:
            if payload is not None:
                return None  # repeated raw_data merges in protobuf: leave such a tensor to the parser
            payload = field
        elif field.number == _TENSOR_DATA_TYPE:
            data_type = _read_varint(data, field.value)[0]
        elif field.number == _TENSOR_DIMS:
            dims.extend(_dims(data, field))
    if payload is None or data_type not in _NATIVE_TYPES:
        return None
    length = payload.end - payload.value
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    if length < LAZY_MIN_BYTES or length != int(np.prod(dims, dtype=np.int64)) * itemsize:
        return None
    return payload


def _dims(data: mmap.mmap, field: _Field) -> Iterator[int]:
    if data[field.start] & 7 == _VARINT:
        yield _read_varint(data, field.value)[0]
        return
    position = field.value
    while position < field.end:  # packed
        value, position = _read_varint(data, position)
        yield value


def _fields(data: mmap.mmap, start: int, end: int) -> Iterator[_Field]:
    position = start
    while position < end:
        key, value = _read_varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            field_end = _read_varint(data, value)[1]
        elif wire_type == _FIXED64:
            field_end = value + 8
        elif wire_type == _FIXED32:
            field_end = value + 4
        elif wire_type == _LENGTH:
            length, value = _read_varint(data, value)
            field_end = value + length
        else:
            raise WireFormatError(f"field {number} has wire type {wire_type}, which ONNX does not use")
        if field_end > end:
            raise WireFormatError(f"field {number} at byte {position} runs past the end of its message")
        yield _Field(number, position, value, field_end)
        position = field_end


def _read_varint(data: mmap.mmap, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise WireFormatError(f"a varint at byte {position} is truncated")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH)


def _refer(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


