"""onnxruntime sessions of jlcm-onnx's own runs (the output check, calibration statistics, verify), built by one
options builder, and onnxruntime's errors turned into one-line messages."""

from __future__ import annotations

import re

import onnxruntime as ort

#: onnxruntime's error classes (Fail, NotImplemented, InvalidGraph, ...), and RuntimeError which some loads raise.
ORT_ERRORS = (RuntimeError, *(
    value for value in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(value, type) and issubclass(value, Exception)
))


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


_ORT_SOURCE = re.compile(r"^\S*onnxruntime_src\S*:\d+ .*?\) (?=[A-Z])")


def session_options(threads: int | None = None, optimize: bool = True, arena: bool = True,
                    prepack: bool = True) -> ort.SessionOptions:
    """Options of a session jlcm-onnx runs itself: onnxruntime's own log off (a failure raises, and is reported with
    :func:`ort_message`); with ``threads``, that many intra-op threads and nodes run one at a time (else onnxruntime's
    default); graph optimisations unless ``optimize`` is False; the CPU memory arena unless ``arena`` is False (a
    checking run's buffers then go back to the system when freed, instead of staying reserved beside the model being
    compressed); pre-packed weights unless ``prepack`` is False (then onnxruntime holds each weight once)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = arena
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def quiet_run() -> ort.RunOptions:
    """Run options that keep onnxruntime's own error log off stderr (a failed run raises anyway)."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def ort_message(error: BaseException) -> str:
    """The first line of an error, without onnxruntime's ``[ONNXRuntimeError] : 1 : FAIL :`` and source-file
    prefixes."""
    text = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", first_line(error)))
    return text.strip() or type(error).__name__


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
