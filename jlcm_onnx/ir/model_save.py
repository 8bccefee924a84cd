"""Writing outputs safely: atomically (to a temporary file in the destination folder, then renamed over the target,
so a failure never leaves a partial file), never over the input, and past protobuf's 2 GB limit with the large
tensors in one external-data file beside the model, written a tensor at a time."""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import onnx

from jlcm_onnx.errors import OutputError
from jlcm_onnx.ir.lazy_weights import is_lazy, materialize
from jlcm_onnx.ir.model_skeleton import copy_fields, model_with_graph
from jlcm_onnx.ir.tensor_size import stored_bytes

#: Serialized protobuf messages cannot exceed 2 GiB; stay clearly below it.
INLINE_LIMIT_BYTES = 2**31 - 2**26
#: A bound on the bytes of an initializer's fields besides its data, name and dims (type, location, keys).
TENSOR_HEADER_BYTES = 256
#: Models above this are checked and loaded from a temporary file rather than from a serialized copy in memory.
LOADABLE_INLINE_BYTES = 256 << 20
#: Initializers written to the external-data file (smaller ones stay in the model file); those of at least
#: ALIGN_MIN_BYTES start at a multiple of the allocation granularity (onnxruntime maps those, as onnx's own writer
#: aligns them), smaller ones are packed (a 7B model's 98,820 column-block tensors padded to 64 KB each doubled its
#: file); the block of a file-to-file copy.
EXTERNAL_MIN_BYTES, ALIGN_MIN_BYTES, COPY_BLOCK_BYTES = 1024, 1 << 20, 64 << 20
EXTERNAL_ALIGNMENT = mmap.ALLOCATIONGRANULARITY


def check_destination(path: str | os.PathLike, protect: str | os.PathLike | None = None) -> Path:
    """Raises :class:`OutputError` unless a model can be written at ``path`` without touching ``protect``."""
    target = Path(path)
    if protect is not None and target.resolve() == Path(protect).resolve():
        raise OutputError(f"output path {target} is the input model: choose another path")
    if target.is_dir():
        raise OutputError(f"output path {target} is a folder: give a file name")
    if not target.parent.is_dir():
        raise OutputError(f"output folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise OutputError(f"output folder {target.parent} is not writable")
    return target


def save_model(model: onnx.ModelProto, path: str | os.PathLike, protect: Path | None = None) -> int:
    """Writes ``model`` atomically to ``path`` and returns the bytes written (model file plus external data)."""
    target = check_destination(path, protect)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as folder:
            staged = Path(folder) / target.name
            _write(model, staged)
            written = 0
            for file in sorted(Path(folder).iterdir(), key=lambda f: f == staged):  # the model file last
                written += file.stat().st_size
                os.replace(file, target.parent / file.name)
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from None
    return written


def _write(model: onnx.ModelProto, path: Path) -> None:
    if serialized_bytes(model) <= INLINE_LIMIT_BYTES:
        materialize(model)
        path.write_bytes(model.SerializeToString())
    else:
        write_with_external_data(model, path)


def serialized_bytes(model: onnx.ModelProto) -> int:
    """Bytes of ``model`` serialized in one message, its lazy weights read in: exact (but for a few bytes of field
    keys of its lazy weights) up to :data:`INLINE_LIMIT_BYTES`; above, where protobuf cannot encode the message even
    to measure it (``ByteSize`` raises past 2 GB), an upper bound: its structure plus each initializer's data and
    :data:`TENSOR_HEADER_BYTES`."""
    graph = onnx.GraphProto()
    copy_fields(model.graph, graph, skip="initializer")
    bound = model_with_graph(model, graph).ByteSize() + sum(
        stored_bytes(tensor) + TENSOR_HEADER_BYTES + len(tensor.name) + 11 * len(tensor.dims)
        for tensor in model.graph.initializer)
    if bound > INLINE_LIMIT_BYTES:
        return bound
    lazy = sum(int(entry.value) for tensor in model.graph.initializer if is_lazy(tensor)
               for entry in tensor.external_data if entry.key == "length")
    return model.ByteSize() + lazy


def write_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Writes ``model`` to ``path`` with each main-graph initializer of at least :data:`EXTERNAL_MIN_BYTES` in one
    data file beside it (``<name>.data``, large ones aligned to :data:`EXTERNAL_ALIGNMENT` so onnxruntime can map them),
    a tensor at a time: the model is never serialized whole, and weights still in their file are copied file to file
    (``model`` is not modified)."""
    graph = onnx.GraphProto()
    copy_fields(model.graph, graph, skip="initializer")
    location = f"{path.name}.data"
    with open(path.parent / location, "wb") as data:
        for tensor in model.graph.initializer:
            if not is_lazy(tensor) and len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
                graph.initializer.add().CopyFrom(tensor)
                continue
            if stored_bytes(tensor) >= ALIGN_MIN_BYTES:
                data.seek(-data.tell() % EXTERNAL_ALIGNMENT, os.SEEK_CUR)
            offset = data.tell()
            if is_lazy(tensor):
                _copy_lazy(tensor, data)
            else:
                data.write(tensor.raw_data)
            reference = graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                              data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                reference.external_data.add(key=key, value=value)
        data.truncate()
    path.write_bytes(model_with_graph(model, graph).SerializeToString())


def _copy_lazy(tensor: onnx.TensorProto, target: BinaryIO) -> None:
    """Copies a lazy tensor's bytes from its file to ``target``, a block at a time."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    left = int(info["length"])
    with open(info["location"], "rb") as source:
        source.seek(int(info["offset"]))
        while left:
            block = source.read(min(left, COPY_BLOCK_BYTES))
            target.write(block)
            left -= len(block)


@contextmanager
def loadable(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """What ``onnx.checker`` and onnxruntime can load: the serialized model up to :data:`LOADABLE_INLINE_BYTES`,
    else a temporary file with external data (:func:`write_with_external_data`), so that the checker and onnxruntime
    read the model from disk rather than from a serialized copy beside ``model`` (lazy weights are read into ``model``
    for the serialized form only)."""
    if serialized_bytes(model) <= LOADABLE_INLINE_BYTES:
        materialize(model)
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        write_with_external_data(model, path)
        yield str(path)
