"""Writing outputs safely: atomically (to a temporary file in the destination folder, then renamed over the target,
so a failure never leaves a partial file), never over the input, and past protobuf's 2 GB limit with the large
tensors in one external-data file beside the model."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from jlcm_onnx.errors import OutputError
from jlcm_onnx.ir.lazy_weights import materialize

#: Serialized protobuf messages cannot exceed 2 GiB; stay clearly below it.
INLINE_LIMIT_BYTES = 2**31 - 2**26


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
    materialize(model)
    if model.ByteSize() <= INLINE_LIMIT_BYTES:
        path.write_bytes(model.SerializeToString())
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=1024)


@contextmanager
def loadable(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """What ``onnx.checker`` and onnxruntime can load: the serialized model, or a temporary file past 2 GB (lazy
    weights are read into ``model`` first)."""
    materialize(model)
    if model.ByteSize() <= INLINE_LIMIT_BYTES:
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        _write(model, path)
        yield str(path)
