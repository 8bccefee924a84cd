"""The output check, passed before an output is returned or written: ``onnx.checker`` full check, an onnxruntime load,
and a numeric spot check against the original on one batch of synthetic inputs (same output names, shapes and
dtypes, and no NaN or Inf where the original has none). A failure there is an internal error, never a written file.
An input must load in stock onnxruntime (no custom-op library is registered), as the output must too.

Both models run whole when their weights are at most :data:`SEGMENT_BYTES`, else a segment of nodes at a time
(:mod:`jlcm_onnx.ir.segmented_run`), so that checking a 6 GB model does not hold its 6 GB of weights, and checking its
compressed file does not decode all of its weights at once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from jlcm_onnx.errors import ModelError
from jlcm_onnx.ir.model_save import loadable
from jlcm_onnx.ir.model_skeleton import skeleton
from jlcm_onnx.ir.segmented_run import SEGMENT_BYTES, run_in_segments, weight_bytes
from jlcm_onnx.ir.sessions import ORT_ERRORS, ort_message, quiet_run, session_options
from jlcm_onnx.ir.synthetic_inputs import InputDeclaration, declared_inputs, gather_rows, synthetic_feed
from jlcm_onnx.memory_budget import release_freed_memory

#: Synthetic spot-check inputs: size of a symbolic batch (first) axis, and the sizes tried in turn for other symbolic
#: axes until the original runs (convolutional nets may need 32-multiples, audio front ends long windows).
SPOT_BATCH, SPOT_OTHER = 1, (8, 64, 256)
#: Sizes whose feed would exceed this many elements in all are not tried (the spot check stays cheap).
SPOT_MAX_ELEMENTS = 1 << 22
#: Integer spot-check inputs (token ids, indices) are drawn in ``[0, min(SPOT_INT_HIGH, smallest Gather table))``.
SPOT_INT_HIGH = 10
CPU = ["CPUExecutionProvider"]
#: Segments of a compressed model hold this many bytes of stored weights: they decode to several times more while they
#: run (8x for 4-bit codes of fp32 weights; a 256 MB segment of a 1.5B-parameter model's codes spiked the run by 2 GB).
COMPRESSED_SEGMENT_BYTES = SEGMENT_BYTES // 8


@dataclass
class Reference:
    """The input as the output check compares against it: whether it passes the full ``onnx.checker`` check (strict
    shape inference) itself (when it does not, the output is held to the basic check), and its outputs on one
    synthetic batch (``feed``, ``output_names`` and ``outputs``), or why it runs on none (``skipped``). Only these are
    kept, never an onnxruntime session, so the input's weights are not held twice while it is compressed."""

    full_check: bool
    table_rows: int | None
    inputs: tuple[InputDeclaration, ...]
    seed: int = 0
    output_names: list[str] = field(default_factory=list)
    feed: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: list[np.ndarray] = field(default_factory=list)
    skipped: str = ""

    def run(self, outputs: Callable[[dict[str, np.ndarray]], list[np.ndarray]], output_names: list[str]) -> None:
        """Runs the input (``outputs`` of a feed) on the synthetic batch and keeps what it gave."""
        ran = _run_reference(outputs, self.inputs, self.table_rows, self.seed)
        self.output_names = output_names
        if isinstance(ran, str):
            self.skipped = ran
        else:
            self.feed, self.outputs = ran


def reference_for(model: onnx.ModelProto, seed: int = 0, path: Path | None = None) -> Reference:
    """The input's :class:`Reference`; raises :class:`ModelError` when stock onnxruntime cannot load it (an opset or IR
    version newer than it supports, an operator of an unknown custom domain, a type without a CPU kernel).

    The run is unoptimised and without pre-packed weights, so onnxruntime holds each weight once, and only until the
    outputs are kept: before compression, while little else is in memory. A model whose weights exceed
    :data:`SEGMENT_BYTES` runs a segment of its nodes at a time (:mod:`jlcm_onnx.ir.segmented_run`: the same outputs,
    bit for bit, with one segment's weights in memory), after a session of its structure (the large weights as inputs:
    the same operators and kernels) has shown that onnxruntime loads it. A smaller one runs whole; given the ``path``
    it was read from, from that file: the lazily read ``model`` holds few of its weights yet, and onnxruntime copies
    initializers handed to it as arrays, so a session of ``model`` would hold them twice.
    """
    structure = skeleton(model).SerializeToString()
    reference = Reference(_passes_full_check(structure), gather_rows(model), declared_inputs(model), seed)
    output_names = [value.name for value in model.graph.output]
    if weight_bytes(model) > SEGMENT_BYTES:
        _reference_session(structure)
        del structure
        reference.run(lambda feed: run_in_segments(model, feed, SEGMENT_BYTES, _reference_options, CPU), output_names)
    else:
        del structure
        with nullcontext(str(path)) if path is not None else loadable(model) as loaded:
            session = _reference_session(loaded)
        reference.run(lambda feed: session.run(None, feed, quiet_run()), output_names)
        del session
    release_freed_memory()
    return reference


def _reference_options() -> ort.SessionOptions:
    return session_options(optimize=False, arena=False, prepack=False)


def _reference_session(model: bytes | str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, _reference_options(), providers=CPU)
    except ORT_ERRORS as error:
        raise ModelError(f"onnxruntime {ort.__version__} cannot load the input model: {ort_message(error)}") from None


def _passes_full_check(model: bytes | str) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def check_output(model: onnx.ModelProto, reference: Reference | None = None) -> str | None:
    """The output check before an output is returned or written: ``onnx.checker`` full check (the basic check when
    the input itself fails the full one), an onnxruntime load of the whole model and, given the input's reference, a
    numeric spot check (:func:`spot_check`; a segment at a time for a model above :data:`SEGMENT_BYTES`).

    Raises RuntimeError (an internal error: the input was fine, the output is not) when a check fails; returns a note
    when the spot check could not be run.
    """
    full_check = reference is None or reference.full_check
    try:
        with loadable(model) as serialized:
            onnx.checker.check_model(serialized, full_check=full_check)
            release_freed_memory()  # the checker's parsed copy, before onnxruntime makes its own
            session = ort.InferenceSession(serialized, _checking_options(), providers=CPU)
            del serialized  # the serialized copy, before the run decodes the weights
        release_freed_memory()
    except Exception as error:  # noqa: BLE001 - whatever fails, the output is broken: an internal error
        raise RuntimeError(f"the compressed model fails its checks: {ort_message(error)}") from error
    if reference is None:
        return None
    output_names = [value.name for value in session.get_outputs()]
    if weight_bytes(model) <= SEGMENT_BYTES:
        run_whole = session.run
        return spot_check(reference, output_names, lambda feed: run_whole(None, feed, quiet_run()))
    del session  # loaded: it runs a segment at a time, each decoding only its own weights
    release_freed_memory()
    return spot_check(reference, output_names,
                      lambda feed: run_in_segments(model, feed, COMPRESSED_SEGMENT_BYTES, _checking_options, CPU))


def _checking_options() -> ort.SessionOptions:
    return session_options(arena=False)


def spot_check(reference: Reference, output_names: list[str],
               outputs: Callable[[dict[str, np.ndarray]], list[np.ndarray]]) -> str | None:
    """Runs the compressed model (``outputs`` of a feed) on the reference's synthetic batch and compares its outputs
    with the original's.

    The check is loose, as quantization changes values: the same output names, shapes and dtypes, and no NaN or Inf
    where the original has none. Raises RuntimeError on a mismatch; returns a note (and checks nothing) when the
    original cannot run on synthetic inputs.
    """
    if reference.skipped:
        return f"spot check skipped: the original model does not run on synthetic inputs ({reference.skipped})"
    names = reference.output_names
    if output_names != names:
        raise RuntimeError("the compressed model's outputs differ from the original's: names or order changed")
    try:
        actual = outputs(reference.feed)
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
    outputs: Callable[[dict[str, np.ndarray]], list[np.ndarray]], inputs: tuple[InputDeclaration, ...],
    table_rows: int | None, seed: int,
) -> tuple[dict[str, np.ndarray], list] | str:
    """(feed, outputs) of the original on the first synthetic sizes it runs on, or why it runs on none."""
    reason = ""
    high = min(SPOT_INT_HIGH, table_rows or SPOT_INT_HIGH)
    for attempt, other in enumerate(SPOT_OTHER):
        try:
            feed = synthetic_feed(inputs, np.random.default_rng(seed), SPOT_BATCH, other, high)
            if attempt and sum(a.size for a in feed.values()) > SPOT_MAX_ELEMENTS:
                break
            return feed, outputs(feed)
        except Exception as error:  # noqa: BLE001 - any failure of the original: try larger sizes, else no check
            reason = reason or ort_message(error)
    return reason
