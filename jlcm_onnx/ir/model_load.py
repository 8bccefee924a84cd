"""Reading input models: only ever read, never modified.

External data is read only from inside the model's folder: a tensor whose ``location`` is absolute, climbs out with
``..`` or resolves (through symlinks) outside the folder is refused before anything is read (cf. onnx
CVE-2024-27318/27319). A model read from a file keeps its large weights in their files
(:mod:`jlcm_onnx.ir.lazy_weights`) until read.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from pathlib import Path, PureWindowsPath

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.errors import ModelError
from jlcm_onnx.ir.lazy_weights import defer_external_data, defer_payloads, read_structure
from jlcm_onnx.ir.model_skeleton import skeleton
from jlcm_onnx.ir.sessions import first_line
from jlcm_onnx.ir.weight_sites import compressible_row_axis, default_opset, find_weight_sites, iter_graphs

#: The oldest ai.onnx opset the decoder subgraph can be expressed in (BitShift, GatherElements).
MIN_OPSET = 11


#: Operators that mean a model is already quantized; its integer weights are left as they are.
QUANTIZED_OPS = {
    "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
    "ConvInteger", "MatMulNBits", "MatMulBnb4", "QAttention", "QGemm", "QLinearAdd", "QLinearMul",
    "DynamicQuantizeMatMul", "GatherBlockQuantized", "MatMulIntegerToFloat",
}


def load_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(a private copy of the model, its size in bytes: file size(s) on disk, or serialized size of a proto).

    A model read from a file keeps its large weights in their files (:mod:`jlcm_onnx.ir.lazy_weights`) until read."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        for tensor in external_data_helper._get_all_tensors(model):
            if external_data_helper.uses_external_data(tensor):
                raise ModelError(
                    f"tensor '{tensor.name}' keeps its data in external file '{_location(tensor)}': pass the model's "
                    "path (not a ModelProto) so the file is read from the model's folder"
                )
        return model, model.ByteSize()
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"input model {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is empty: not an ONNX model")
    try:
        model, payloads = read_structure(path)
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise ModelError(f"{path} is not a readable ONNX model: {first_line(error)}") from None
    check_external_locations(model, path.parent)
    external = _external_files(model, path.parent)
    defer_payloads(model, path, payloads)
    try:
        defer_external_data(model, path.parent)
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise ModelError(f"cannot read external data of {path}: {first_line(error)}") from None
    return model, path.stat().st_size + sum(f.stat().st_size for f in external)


def check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    """Raises :class:`ModelError` naming the tensor unless every external-data location lies inside ``folder``.

    Refused: an absolute location (POSIX or Windows), one whose ``..`` climbs out of the folder, and one that resolves
    outside it through a symbolic link. Only strings are examined, and ``stat`` calls made: no file is opened.
    """
    root = folder.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = _location(tensor)
        where = f"tensor '{tensor.name}' has external data location '{location}'"
        if not location:
            raise ModelError(f"tensor '{tensor.name}' uses external data but gives no location")
        if "\0" in location:
            raise ModelError(f"{where}: it contains a NUL character")
        if location.startswith(("/", "\\")) or PureWindowsPath(location).drive or Path(location).is_absolute():
            raise ModelError(f"{where}: an absolute path; external data must be inside the model's folder")
        normal = posixpath.normpath(location.replace("\\", "/"))
        if normal == ".." or normal.startswith("../"):
            raise ModelError(f"{where}: '..' leads outside the model's folder")
        if not (folder / location).resolve().is_relative_to(root):
            raise ModelError(f"{where}: it resolves (through a symbolic link) outside the model's folder")


def check_input(model: onnx.ModelProto, config: CompressionConfig | None = None) -> None:
    """Raises :class:`ModelError` unless ``model`` is a valid ONNX model the decoder can extend.

    The decoder's minimum opset is only required when ``config`` (default: the default config) would compress a
    weight: a model with nothing to compress is returned as it is, whatever its opset.
    """
    if len(model.graph.node) == 0:
        raise ModelError("the model's graph has no nodes")
    try:  # on the structure: onnxruntime's load (reference_for) then reads every weight
        onnx.checker.check_model(skeleton(model))
    except onnx.checker.ValidationError as error:
        raise ModelError(f"the input is not a valid ONNX model: {first_line(error)}") from None
    opset = default_opset(model)
    if opset < MIN_OPSET and _has_compressible_weight(model, config or CompressionConfig()):
        raise ModelError(
            f"the model uses ai.onnx opset {opset}; the decoder needs opset >= {MIN_OPSET} "
            "(upgrade it with onnx.version_converter.convert_version)"
        )


def quantization_note(model: onnx.ModelProto) -> str | None:
    """A note saying the model is already quantized (which quantized operators it has), or None."""
    found = Counter(
        node.op_type for graph in iter_graphs(model.graph) for node in graph.node if node.op_type in QUANTIZED_OPS
    )
    if not found:
        return None
    ops = ", ".join(f"{count} {op}" for op, count in sorted(found.items()))
    return f"already quantized ({ops}): its integer weights and quantized operators are left as they are"


def _has_compressible_weight(model: onnx.ModelProto, config: CompressionConfig) -> bool:
    # stops at the first: deciding a data-read tensor reads its values, which the input check need not do for all
    return any(compressible_row_axis(site, config)[0] is not None for site in find_weight_sites(model))


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _external_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    files = {folder / _location(t) for t in external_data_helper._get_all_tensors(model)
             if external_data_helper.uses_external_data(t)}
    return [f for f in sorted(files) if f.is_file()]
