"""Reading input models and writing outputs safely.

The input is only ever read. An output is checked (``onnx.checker`` full check, then loaded by onnxruntime) before it
is written, and written atomically: to a temporary file in the destination folder, then renamed over the target, so a
failure never leaves a partial file. Models whose serialization would pass protobuf's 2 GB limit are written with their
large tensors in one external-data file beside the model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from jlcm_onnx.errors import ModelError, OutputError

#: Serialized protobuf messages cannot exceed 2 GiB; stay clearly below it.
INLINE_LIMIT_BYTES = 2**31 - 2**26

#: The oldest ai.onnx opset the decode subgraph can be expressed in (BitShift, GatherElements).
MIN_OPSET = 11


def load_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(a private copy of the model, its size in bytes: file size(s) on disk, or serialized size of a proto)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model, model.ByteSize()
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"input model {path} does not exist or is not a file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise ModelError(f"{path} is not a readable ONNX model: {_first_line(error)}") from None
    external = _external_files(model, path.parent)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise ModelError(f"cannot read external data of {path}: {_first_line(error)}") from None
    return model, path.stat().st_size + sum(f.stat().st_size for f in external)


def check_input(model: onnx.ModelProto) -> None:
    """Raises :class:`ModelError` unless ``model`` is a valid ONNX model the decoder can extend."""
    if len(model.graph.node) == 0:
        raise ModelError("the model's graph has no nodes")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise ModelError(f"the input is not a valid ONNX model: {_first_line(error)}") from None
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(
            f"the model uses ai.onnx opset {opset}; the decoder needs opset >= {MIN_OPSET} "
            "(upgrade it with onnx.version_converter.convert_version)"
        )


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def check_output(model: onnx.ModelProto) -> None:
    """Full ONNX check and an onnxruntime load; raises RuntimeError (an internal error) when either fails."""
    if model.ByteSize() > INLINE_LIMIT_BYTES:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            _write(model, path)
            onnx.checker.check_model(str(path), full_check=True)
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return
    onnx.checker.check_model(model, full_check=True)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


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
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as folder:
        staged = Path(folder) / target.name
        try:
            _write(model, staged)
        except OSError as error:
            raise OutputError(f"cannot write {target}: {error.strerror or error}") from None
        written = 0
        for file in sorted(Path(folder).iterdir(), key=lambda f: f == staged):  # the model file last
            written += file.stat().st_size
            os.replace(file, target.parent / file.name)
    return written


def _write(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() <= INLINE_LIMIT_BYTES:
        path.write_bytes(model.SerializeToString())
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=1024)


def _external_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    files = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            files.add(folder / location)
    return [f for f in sorted(files) if f.is_file()]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
