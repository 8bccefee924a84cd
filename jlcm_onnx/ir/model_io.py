"""Reading input models and writing outputs safely.

The input is only ever read. External data is read only from inside the model's folder: a tensor whose ``location``
is absolute, climbs out with ``..`` or resolves (through symlinks) outside the folder is refused before anything is
read (cf. onnx CVE-2024-27318/27319). An input must load in stock onnxruntime (no custom-op library is registered), as
the output must too.

An output is gated before it is written: ``onnx.checker`` full check, an onnxruntime load, and a numeric spot check
against the original on one batch of synthetic inputs (same output names, shapes and dtypes, and no NaN or Inf where
the original has none); a failure there is an internal error, never a written file. The write is atomic: to a
temporary file in the destination folder, then renamed over the target, so a failure never leaves a partial file.
Models whose serialization would pass protobuf's 2 GB limit are written with their large tensors in one
external-data file beside the model.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.errors import ModelError, OutputError
from jlcm_onnx.ir.lazy_weights import defer_external_data, defer_payloads, materialize, read_structure
from jlcm_onnx.ir.model_skeleton import skeleton
from jlcm_onnx.ir.weight_sites import compressible_row_axis, find_weight_sites
from jlcm_onnx.memory_budget import release_freed_memory

#: Serialized protobuf messages cannot exceed 2 GiB; stay clearly below it.
INLINE_LIMIT_BYTES = 2**31 - 2**26

#: The oldest ai.onnx opset the decoder subgraph can be expressed in (BitShift, GatherElements).
MIN_OPSET = 11

#: Synthetic spot-check inputs: size of a symbolic batch (first) axis, and the sizes tried in turn for other symbolic
#: axes until the original runs (convolutional nets may need 32-multiples, audio front ends long windows).
SPOT_BATCH, SPOT_OTHER = 1, (8, 64, 256)
#: Sizes whose feed would exceed this many elements in all are not tried (the spot check stays cheap).
SPOT_MAX_ELEMENTS = 1 << 22
#: Integer spot-check inputs (token ids, indices) are drawn in ``[0, min(SPOT_INT_HIGH, smallest Gather table))``.
SPOT_INT_HIGH = 10

#: Operators that mean a model is already quantized; its integer weights are left as they are.
QUANTIZED_OPS = {
    "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
    "ConvInteger", "MatMulNBits", "MatMulBnb4", "QAttention", "QGemm", "QLinearAdd", "QLinearMul",
    "DynamicQuantizeMatMul", "GatherBlockQuantized", "MatMulIntegerToFloat",
}

#: onnxruntime's error classes (Fail, NotImplemented, InvalidGraph, ...), and RuntimeError which some loads raise.
_ORT_ERRORS = (RuntimeError, *(
    value for value in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(value, type) and issubclass(value, Exception)
))
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"^\S*onnxruntime_src\S*:\d+ .*?\) (?=[A-Z])")


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
        raise ModelError(f"{path} is not a readable ONNX model: {_first_line(error)}") from None
    check_external_locations(model, path.parent)
    external = _external_files(model, path.parent)
    defer_payloads(model, path, payloads)
    try:
        defer_external_data(model, path.parent)
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise ModelError(f"cannot read external data of {path}: {_first_line(error)}") from None
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
        raise ModelError(f"the input is not a valid ONNX model: {_first_line(error)}") from None
    opset = default_opset(model)
    if opset < MIN_OPSET and _has_compressible_weight(model, config or CompressionConfig()):
        raise ModelError(
            f"the model uses ai.onnx opset {opset}; the decoder needs opset >= {MIN_OPSET} "
            "(upgrade it with onnx.version_converter.convert_version)"
        )


@dataclass
class Reference:
    """The input as the output gate compares against it: whether it passes the full ``onnx.checker`` check (strict
    shape inference) itself (when it does not, the output is held to the basic check), and its outputs on one
    synthetic batch (``feed``, ``output_names`` and ``outputs``), or why it runs on none (``skipped``). Only these are
    kept, never an onnxruntime session, so the input's weights are not held twice while it is compressed."""

    full_check: bool
    table_rows: int | None
    seed: int = 0
    output_names: list[str] = field(default_factory=list)
    feed: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: list[np.ndarray] = field(default_factory=list)
    skipped: str = ""

    def run(self, session: ort.InferenceSession) -> None:
        """Runs the input's ``session`` on the synthetic batch and keeps what it gave."""
        ran = _run_reference(session, self.table_rows, self.seed)
        self.output_names = [o.name for o in session.get_outputs()]
        if isinstance(ran, str):
            self.skipped = ran
        else:
            self.feed, self.outputs = ran


def reference_for(model: onnx.ModelProto, seed: int = 0, path: Path | None = None) -> Reference:
    """The input's :class:`Reference`; raises :class:`ModelError` when stock onnxruntime cannot load it (an opset or IR
    version newer than it supports, an operator of an unknown custom domain, a type without a CPU kernel).

    Given the ``path`` the model was read from, onnxruntime runs it from that file: the lazily read ``model`` holds few
    of its weights yet, and onnxruntime copies initializers handed to it as arrays (memory-mapped or not), so a session
    of ``model`` would hold them twice. The run is unoptimised and without pre-packed weights, so onnxruntime holds the
    weights once, and only until the outputs are kept: before compression, while little else is in memory.
    """
    structure = skeleton(model).SerializeToString()
    reference = Reference(_passes_full_check(structure), gather_rows(model), seed)
    del structure
    if path is not None:
        reference.run(_reference_session(str(path)))
    else:
        with _loadable(model) as loadable:
            reference.run(_reference_session(loadable))
    release_freed_memory()
    return reference


def _reference_session(loadable: bytes | str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(loadable, _reference_options(), providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as error:
        raise ModelError(f"onnxruntime {ort.__version__} cannot load the input model: {ort_message(error)}") from None


def _reference_options() -> ort.SessionOptions:
    options = _quiet_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def _passes_full_check(loadable: bytes | str) -> bool:
    try:
        onnx.checker.check_model(loadable, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def quantization_note(model: onnx.ModelProto) -> str | None:
    """A note saying the model is already quantized (which quantized operators it has), or None."""
    found = Counter(
        node.op_type for graph in _graphs(model.graph) for node in graph.node if node.op_type in QUANTIZED_OPS
    )
    if not found:
        return None
    ops = ", ".join(f"{count} {op}" for op, count in sorted(found.items()))
    return f"already quantized ({ops}): its integer weights and quantized operators are left as they are"


def _has_compressible_weight(model: onnx.ModelProto, config: CompressionConfig) -> bool:
    return any(compressible_row_axis(site, config)[0] is not None for site in find_weight_sites(model))


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def check_output(model: onnx.ModelProto, reference: Reference | None = None) -> str | None:
    """The gate before an output is returned or written: ``onnx.checker`` full check (the basic check when the input
    itself fails the full one), an onnxruntime load and, given the input's reference, a numeric spot check
    (:func:`spot_check`).

    Raises RuntimeError (an internal error: the input was fine, the output is not) when a check fails; returns a note
    when the spot check could not be run.
    """
    full_check = reference is None or reference.full_check
    try:
        with _loadable(model) as loadable:
            onnx.checker.check_model(loadable, full_check=full_check)
            release_freed_memory()  # the checker's parsed copy, before onnxruntime makes its own
            session = ort.InferenceSession(loadable, _quiet_options(), providers=["CPUExecutionProvider"])
            del loadable  # the serialized copy, before the run decodes the weights
        release_freed_memory()
    except Exception as error:  # noqa: BLE001 - whatever fails, the output is broken: an internal error
        raise RuntimeError(f"the compressed model fails its checks: {ort_message(error)}") from error
    if reference is None:
        return None
    return spot_check(reference, session)


def spot_check(reference: Reference, candidate: ort.InferenceSession) -> str | None:
    """Runs the compressed model on the reference's synthetic batch and compares its outputs with the original's.

    The check is loose, as quantization changes values: the same output names, shapes and dtypes, and no NaN or Inf
    where the original has none. Raises RuntimeError on a mismatch; returns a note (and checks nothing) when the
    original cannot run on synthetic inputs.
    """
    if reference.skipped:
        return f"spot check skipped: the original model does not run on synthetic inputs ({reference.skipped})"
    names = reference.output_names
    if [o.name for o in candidate.get_outputs()] != names:
        raise RuntimeError("the compressed model's outputs differ from the original's: names or order changed")
    try:
        actual = candidate.run(names, reference.feed, _quiet_run())
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"the compressed model fails on inputs the original runs on: {ort_message(error)}") from None
    for name, want, got in zip(names, reference.outputs, actual, strict=True):
        want, got = np.asarray(want), np.asarray(got)
        if want.shape != got.shape or want.dtype != got.dtype:
            raise RuntimeError(
                f"spot check: output '{name}' is {got.dtype}{list(got.shape)}, the original's {want.dtype}"
                f"{list(want.shape)}"
            )
        if want.dtype.kind in "fc" and np.any(np.isfinite(want) & ~np.isfinite(got)):
            raise RuntimeError(f"spot check: output '{name}' has NaN or Inf where the original is finite")
    return None


def _run_reference(
    reference: ort.InferenceSession, table_rows: int | None, seed: int
) -> tuple[dict[str, np.ndarray], list] | str:
    """(feed, outputs) of the original on the first synthetic sizes it runs on, or why it runs on none."""
    reason = ""
    for attempt, other in enumerate(SPOT_OTHER):
        try:
            feed = synthetic_feed(reference, table_rows, seed, other)
            if attempt and sum(a.size for a in feed.values()) > SPOT_MAX_ELEMENTS:
                break
            return feed, reference.run(None, feed, _quiet_run())
        except Exception as error:  # noqa: BLE001 - any failure of the original: try larger sizes, else no check
            reason = reason or ort_message(error)
    return reason


def synthetic_feed(
    session: ort.InferenceSession, table_rows: int | None = None, seed: int = 0, other: int = SPOT_OTHER[0]
) -> dict[str, np.ndarray]:
    """One seeded batch shaped like the session's inputs: symbolic dims are 1 on the first axis and ``other``
    elsewhere (the same symbol the same size), floats are standard normal, integers in ``[0, min(10, table_rows))``."""
    rng = np.random.default_rng(seed)
    high = max(1, min(SPOT_INT_HIGH, table_rows or SPOT_INT_HIGH))
    symbols: dict[str, int] = {}
    feed = {}
    for spec in session.get_inputs():
        shape = []
        for axis, dim in enumerate(spec.shape):
            size = dim if isinstance(dim, int) and dim >= 0 else (SPOT_BATCH if axis == 0 else other)
            shape.append(symbols.setdefault(dim, size) if isinstance(dim, str) and dim else size)
        dtype = _ort_dtype(spec.type)
        if dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feed[spec.name] = rng.integers(0, high, shape).astype(dtype)
        elif dtype.kind == "b":
            feed[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise ValueError(f"input '{spec.name}' of type {spec.type} has no synthetic values")
    return feed


def gather_rows(model: onnx.ModelProto) -> int | None:
    """Rows of the smallest stored table a ``Gather`` reads (a bound for synthetic indices), or None."""
    stored = {t.name: t for g in _graphs(model.graph) for t in g.initializer}
    rows = [
        stored[node.input[0]].dims[0]
        for g in _graphs(model.graph) for node in g.node
        if node.op_type == "Gather" and node.input[0] in stored and stored[node.input[0]].dims
    ]
    return min(rows, default=None)


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
def _loadable(model: onnx.ModelProto) -> Iterator[bytes | str]:
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


def _quiet_options() -> ort.SessionOptions:
    """Silent sessions without the CPU memory arena: a checking run's buffers go back to the system when freed
    instead of staying reserved beside the model being compressed."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.enable_cpu_mem_arena = False
    return options


def _quiet_run() -> ort.RunOptions:
    """Run options that keep onnxruntime's own error log off stderr (a failed run raises anyway)."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def _ort_dtype(type_name: str) -> np.dtype:
    """numpy dtype of an onnxruntime type string such as ``tensor(float16)``; object for what is not a tensor."""
    inner = type_name.removeprefix("tensor(").removesuffix(")")
    names = {"float": "float32", "double": "float64", "bool": "bool"}
    try:
        return np.dtype(names.get(inner, inner))
    except TypeError:
        return np.dtype(object)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _graphs(subgraph)


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _external_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    files = {folder / _location(t) for t in external_data_helper._get_all_tensors(model)
             if external_data_helper.uses_external_data(t)}
    return [f for f in sorted(files) if f.is_file()]


def ort_message(error: BaseException) -> str:
    """The first line of an error, without onnxruntime's ``[ONNXRuntimeError] : 1 : FAIL :`` and source-file
    prefixes."""
    text = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", _first_line(error)))
    return text.strip() or type(error).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
