"""The output check, passed before an output is returned or written: ``onnx.checker`` full check, an onnxruntime load,
and a numeric spot check against the original on one batch of synthetic inputs (same output names, shapes and
dtypes, and no NaN or Inf where the original has none). A failure there is an internal error, never a written file.
An input must load in stock onnxruntime (no custom-op library is registered), as the output must too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from jlcm_onnx.errors import ModelError
from jlcm_onnx.ir.model_save import loadable
from jlcm_onnx.ir.model_skeleton import skeleton
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

    def run(self, session: ort.InferenceSession) -> None:
        """Runs the input's ``session`` on the synthetic batch and keeps what it gave."""
        ran = _run_reference(session, self.inputs, self.table_rows, self.seed)
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
    reference = Reference(_passes_full_check(structure), gather_rows(model), declared_inputs(model), seed)
    del structure
    if path is not None:
        reference.run(_reference_session(str(path)))
    else:
        with loadable(model) as serialized:
            reference.run(_reference_session(serialized))
    release_freed_memory()
    return reference


def _reference_session(model: bytes | str) -> ort.InferenceSession:
    options = session_options(optimize=False, arena=False, prepack=False)
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
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
    the input itself fails the full one), an onnxruntime load and, given the input's reference, a numeric spot
    check (:func:`spot_check`).

    Raises RuntimeError (an internal error: the input was fine, the output is not) when a check fails; returns a note
    when the spot check could not be run.
    """
    full_check = reference is None or reference.full_check
    try:
        with loadable(model) as serialized:
            onnx.checker.check_model(serialized, full_check=full_check)
            release_freed_memory()  # the checker's parsed copy, before onnxruntime makes its own
            session = ort.InferenceSession(serialized, session_options(arena=False), providers=["CPUExecutionProvider"])
            del serialized  # the serialized copy, before the run decodes the weights
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
        actual = candidate.run(names, reference.feed, quiet_run())
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
    reference: ort.InferenceSession, inputs: tuple[InputDeclaration, ...], table_rows: int | None, seed: int
) -> tuple[dict[str, np.ndarray], list] | str:
    """(feed, outputs) of the original on the first synthetic sizes it runs on, or why it runs on none."""
    reason = ""
    high = min(SPOT_INT_HIGH, table_rows or SPOT_INT_HIGH)
    for attempt, other in enumerate(SPOT_OTHER):
        try:
            feed = synthetic_feed(inputs, np.random.default_rng(seed), SPOT_BATCH, other, high)
            if attempt and sum(a.size for a in feed.values()) > SPOT_MAX_ELEMENTS:
                break
            return feed, reference.run(None, feed, quiet_run())
        except Exception as error:  # noqa: BLE001 - any failure of the original: try larger sizes, else no check
            reason = reason or ort_message(error)
    return reason
