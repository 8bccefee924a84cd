"""Output fidelity, size and latency of a compressed model against its original, both run in onnxruntime.

Both models get the same inputs: calibration-style data (any source :func:`jlcm_onnx.load_calibration` reads) or, with
no data, seeded synthetic inputs derived from the model's input types. For every output present in both models, over
all runs, with ``x`` the original's values and ``y`` the compressed model's (computed in float64):

- ``max_abs_error = max |y - x|`` and ``mean_abs_error = mean |y - x|``;
- ``cosine``: ``x.y / (|x| |y|)`` per sample row (axis 0 of an output of rank >= 2, flattened; the whole output
  otherwise), averaged over rows;
- ``sqnr_db = 10 log10(sum x^2 / sum (y - x)^2)`` (infinite, reported as exact, when the outputs are equal);
- ``top1_agreement``: for float outputs whose last axis has more than one entry, the fraction of positions where
  ``argmax`` over the last axis is the same; not for embeddings, whose argmax over hidden units means nothing;
- ``kl_divergence``: for logits, the mean over positions of ``KL(softmax(x) || softmax(y))`` over the last axis, in
  nats;
- ``nonfinite``: values that are NaN/Inf in the compressed output but finite in the original.

An output's *kind* comes from its name: ``logits`` (a name holding "logit"), ``embeddings`` ("embed", "hidden",
"pool") or ``other``. Where the inputs carry an attention mask (see :func:`jlcm_onnx.load_calibration`) and an
output's leading axes are its positions, every metric counts only the real (unpadded) positions, and a sample row of
the cosine is one position's vector.

Sizes are bytes on disk (model file plus external data; serialized size for an in-memory model). Latency is the median
of ``repeats`` runs on the first sample after one warm-up run, with a fixed number of intra-op threads.

Synthetic inputs (:mod:`jlcm_onnx.ir.synthetic_inputs`): symbolic dims are 1 on axis 0 (the batch) and 16 elsewhere,
the same symbol getting the same size in every input; floats are standard normal; integer inputs look like token ids
(``0..99``, and below the rows of the smallest table a Gather reads), except names containing ``mask`` (ones),
``type``/``segment`` (zeros) and ``position`` (``0, 1, 2, ...`` along the last axis).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from jlcm_onnx.analysis.calibration import (
    CalibrationData,
    CalibrationSource,
    at_real_positions,
    lines_up,
    load_calibration,
    model_inputs,
)
from jlcm_onnx.errors import ConfigError, ModelError
from jlcm_onnx.ir.model_load import load_model
from jlcm_onnx.ir.runtime import inference_session
from jlcm_onnx.ir.sessions import session_options
from jlcm_onnx.ir.synthetic_inputs import declared_inputs, gather_rows, synthetic_feed
from jlcm_onnx.report import align_columns, format_bytes

SYMBOLIC_BATCH, SYMBOLIC_OTHER = 1, 16
LOGITS, EMBEDDINGS = "logits", "embeddings"
TOKEN_IDS = 100


@dataclass(frozen=True)
class OutputFidelity:
    """How close one output of the compressed model is to the original's, over every verification run."""

    name: str
    shape: tuple[int, ...]  # of the first run
    dtype: str
    max_abs_error: float
    mean_abs_error: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None
    nonfinite: int
    kind: str = "other"
    kl_divergence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["shape"] = list(self.shape)
        values["exact"] = self.max_abs_error == 0.0
        for key in ("max_abs_error", "mean_abs_error", "cosine", "sqnr_db", "top1_agreement", "kl_divergence"):
            if values[key] is not None and not math.isfinite(values[key]):
                values[key] = None  # JSON has no infinity or NaN; "exact" tells an infinite SQNR apart
        return values


@dataclass
class VerifyReport:
    """Per-output fidelity, file sizes and median latencies of an original and a compressed model."""

    original: str
    compressed: str
    outputs: list[OutputFidelity]
    original_file_bytes: int
    compressed_file_bytes: int
    original_latency_ms: float
    compressed_latency_ms: float
    samples: int
    data: str
    providers: list[str]
    threads: int
    repeats: int
    runs: int = 1
    latency_input_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.original_file_bytes / max(self.compressed_file_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original,
            "compressed": self.compressed,
            "original_file_bytes": self.original_file_bytes,
            "compressed_file_bytes": self.compressed_file_bytes,
            "ratio": round(self.ratio, 4),
            "latency_ms": {"original": round(self.original_latency_ms, 4),
                           "compressed": round(self.compressed_latency_ms, 4)},
            "latency_input_shapes": self.latency_input_shapes,
            "samples": self.samples,
            "runs": self.runs,
            "data": self.data,
            "providers": self.providers,
            "threads": self.threads,
            "repeats": self.repeats,
            "outputs": [o.to_dict() for o in self.outputs],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        rows = [("output", "kind", "shape (first run)", "max abs", "mean abs", "cosine", "SQNR dB", "top-1", "KL",
                 "non-finite")]
        for o in self.outputs:
            sqnr = "exact" if o.max_abs_error == 0.0 else f"{o.sqnr_db:.1f}"
            top1 = "" if o.top1_agreement is None else f"{o.top1_agreement:.4f}"
            kl = "" if o.kl_divergence is None else f"{o.kl_divergence:.4g}"
            rows.append((o.name, o.kind, "x".join(map(str, o.shape)), f"{o.max_abs_error:.4g}",
                         f"{o.mean_abs_error:.4g}", f"{o.cosine:.5f}", sqnr, top1, kl, str(o.nonfinite)))
        lines = align_columns(rows)
        lines.append("")
        lines.append(f"file: {format_bytes(self.original_file_bytes)} -> {format_bytes(self.compressed_file_bytes)} "
                     f"({self.ratio:.2f}x smaller)")
        slower = self.compressed_latency_ms / max(self.original_latency_ms, 1e-9)
        lines.append(f"latency: {self.original_latency_ms:.2f} ms -> {self.compressed_latency_ms:.2f} ms "
                     f"({slower:.2f}x; median of {self.repeats}, {self.threads} threads, {', '.join(self.providers)})")
        lines.append(f"inputs: {self.samples} samples in {self.runs} run{'s' if self.runs != 1 else ''} ({self.data})")
        return "\n".join(lines)


def verify(
    original: str | os.PathLike | onnx.ModelProto,
    compressed: str | os.PathLike | onnx.ModelProto,
    data: CalibrationSource | None = None,
    *,
    samples: int | None = 64,
    seed: int = 0,
    batch_size: int = 8,
    providers: Sequence[str] | None = None,
    threads: int = 2,
    repeats: int = 5,
    keep_compressed: bool = True,
) -> VerifyReport:
    """Runs both models on the same inputs and measures output fidelity, sizes and latency.

    Args:
        original: the reference model (path or ``ModelProto``).
        compressed: the model to check, with the same input names and types.
        data: inputs (any :func:`jlcm_onnx.load_calibration` source); ``None`` for seeded synthetic inputs.
        samples: the most samples used (sub-sampled with ``seed``); with synthetic inputs, how many are made.
        seed: seed of the sub-sampling and of synthetic inputs.
        batch_size: samples per run where the model's batch dim is dynamic (see ``CalibrationData.batches``).
        providers: onnxruntime execution providers; CPU by default (see :func:`execution_providers`).
        threads: intra-op threads of both sessions, fixed so that latencies compare.
        repeats: timed runs per model (median reported).
        keep_compressed: load the compressed model as it is (weights decoded on every run); ``False`` decodes them
            once at load time (see :func:`jlcm_onnx.inference_session`).

    Raises:
        ModelError: a model cannot be read or the two models' inputs or outputs do not match.
        CalibrationError: the data does not fit the models.
    """
    for name, number in (("threads", threads), ("repeats", repeats)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigError(name, number, "a positive integer")
    (reference, original_bytes), (candidate, compressed_bytes) = _read(original), _read(compressed)
    _check_same_inputs(reference, candidate)
    if data is None:
        count = 8 if samples is None else samples
        feeds = load_calibration(synthetic_feeds(reference, count, seed), reference, samples=None, seed=seed)
        description = f"synthetic, seed {seed}"
    else:
        feeds = load_calibration(data, reference, samples=samples, seed=seed)
        description = str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__
    providers = list(providers or ["CPUExecutionProvider"])
    options = session_options(threads)
    first = inference_session(original, sess_options=options, providers=providers)
    second = inference_session(compressed, keep_compressed=keep_compressed, sess_options=options,
                               providers=providers)
    names = _common_outputs(first, second)
    outputs, runs = _compare(first, second, names, feeds, batch_size)
    latency_feed = feeds.samples[0]
    return VerifyReport(
        original=_label(original),
        compressed=_label(compressed),
        outputs=outputs,
        original_file_bytes=original_bytes,
        compressed_file_bytes=compressed_bytes,
        original_latency_ms=_median_ms(first, latency_feed, repeats),
        compressed_latency_ms=_median_ms(second, latency_feed, repeats),
        samples=len(feeds),
        data=description,
        providers=providers,
        threads=threads,
        repeats=repeats,
        runs=runs,
        latency_input_shapes={name: list(array.shape) for name, array in latency_feed.items()},
    )


def synthetic_feeds(model: onnx.ModelProto, samples: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``samples`` seeded feeds shaped and typed like the model's inputs (:mod:`jlcm_onnx.ir.synthetic_inputs`; token
    ids below :data:`TOKEN_IDS` and below the rows of the smallest table a Gather reads)."""
    rng = np.random.default_rng(seed)
    inputs = declared_inputs(model)
    high = min(TOKEN_IDS, gather_rows(model) or TOKEN_IDS)
    return [synthetic_feed(inputs, rng, SYMBOLIC_BATCH, SYMBOLIC_OTHER, high) for _ in range(samples)]


# ---------------------------------------------------------------------------------------------------------- helpers


def _check_same_inputs(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    ours = {spec.name: spec.dtype for spec in model_inputs(reference)}
    theirs = {spec.name: spec.dtype for spec in model_inputs(candidate)}
    if ours != theirs:
        def listed(specs: dict[str, np.dtype]) -> str:
            return ", ".join(f"{name}: {dtype}" for name, dtype in specs.items()) or "none"

        raise ModelError(f"the models' inputs differ: original ({listed(ours)}), compressed ({listed(theirs)})")


def _common_outputs(first: ort.InferenceSession, second: ort.InferenceSession) -> list[str]:
    theirs = {o.name for o in second.get_outputs()}
    names = [o.name for o in first.get_outputs() if o.name in theirs]
    if not names:
        raise ModelError("the models have no output name in common")
    return names


class _Accumulator:
    """Running sums of one output's error statistics over every run."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.kl_sum = 0.0
        self.shape: tuple[int, ...] = ()
        self.dtype = ""
        self.max_abs = 0.0
        self.abs_sum = self.signal = self.noise = 0.0
        self.elements = self.nonfinite = 0
        self.cosines: list[float] = []
        self.top1_equal = self.top1_total = 0

    def add(self, name: str, x: np.ndarray, y: np.ndarray, real: np.ndarray | None = None) -> None:
        if x.shape != y.shape:
            raise ModelError(f"output '{name}': the compressed model returns shape {list(y.shape)}, "
                             f"the original {list(x.shape)}")
        if not self.dtype:  # the shape reported is the first run's
            self.shape, self.dtype = y.shape, str(y.dtype)
        if real is not None and lines_up(x, real):  # a per-position output under a mask: its real positions only
            x, y = at_real_positions(x, real).reshape(-1, x.shape[-1]), at_real_positions(y, real).reshape(
                -1, y.shape[-1])
        if y.dtype.kind == "f" and x.shape and x.shape[-1] > 1 and self.kind != EMBEDDINGS:
            positions = x.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1])
            self.top1_equal += int((positions[0].argmax(axis=-1) == positions[1].argmax(axis=-1)).sum())
            self.top1_total += positions[0].shape[0]
            if self.kind == LOGITS:
                self.kl_sum += _kl_divergence(*positions)
        x, y = x.astype(np.float64), y.astype(np.float64)
        self.nonfinite += int((np.isfinite(x) & ~np.isfinite(y)).sum())
        difference = np.abs(y - x)
        if difference.size:
            self.max_abs = max(self.max_abs, float(difference.max()))
        self.abs_sum += float(difference.sum())
        self.elements += difference.size
        self.signal += float(np.square(x).sum())
        self.noise += float(np.square(y - x).sum())
        rows = (x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)) if x.ndim >= 2 else (x.reshape(1, -1),
                                                                                            y.reshape(1, -1))
        for a, b in zip(*rows, strict=True):
            self.cosines.append(_cosine(a, b))

    def result(self, name: str) -> OutputFidelity:
        if self.noise == 0.0:
            sqnr = math.inf
        elif self.signal == 0.0 or not math.isfinite(self.noise):
            sqnr = -math.inf if self.signal == 0.0 else math.nan
        else:
            sqnr = 10.0 * math.log10(self.signal / self.noise)
        return OutputFidelity(
            name=name,
            shape=tuple(int(d) for d in self.shape),
            dtype=self.dtype,
            max_abs_error=self.max_abs,
            mean_abs_error=self.abs_sum / max(self.elements, 1),
            cosine=float(np.mean(self.cosines)) if self.cosines else math.nan,
            sqnr_db=sqnr,
            top1_agreement=self.top1_equal / self.top1_total if self.top1_total else None,
            nonfinite=self.nonfinite,
            kind=self.kind,
            kl_divergence=self.kl_sum / self.top1_total if self.kind == LOGITS and self.top1_total else None,
        )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norms)


def output_kind(name: str) -> str:
    """``logits``, ``embeddings`` or ``other``, from an output's name (see the module docstring)."""
    lower = name.lower()
    if "logit" in lower:
        return LOGITS
    return EMBEDDINGS if any(word in lower for word in ("embed", "hidden", "pool")) else "other"


def _kl_divergence(x: np.ndarray, y: np.ndarray) -> float:
    """Sum over the rows of ``KL(softmax(x) || softmax(y))`` (float64, log-sum-exp stabilised)."""
    log_p = x - x.max(axis=-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=-1, keepdims=True))
    log_q = y - y.max(axis=-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=-1, keepdims=True))
    return float((np.exp(log_p) * (log_p - log_q)).sum())


def _compare(first: ort.InferenceSession, second: ort.InferenceSession, names: list[str], feeds: CalibrationData,
             batch_size: int) -> tuple[list[OutputFidelity], int]:
    totals = {name: _Accumulator(output_kind(name)) for name in names}
    runs = 0
    for feed in feeds.batches(batch_size):
        real = None if feeds.mask is None else np.asarray(feed[feeds.mask]) != 0
        for name, x, y in zip(names, first.run(names, feed), second.run(names, feed), strict=True):
            totals[name].add(name, np.asarray(x), np.asarray(y), real)
        runs += 1
    return [totals[name].result(name) for name in names], runs


def _median_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray], repeats: int) -> float:
    session.run(None, feed)  # warm-up: first-run allocations and kernel selection
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feed)
        timings.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(timings)


def _read(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(the model, its bytes: the serialized proto, or the files on disk with external data)."""
    if isinstance(source, onnx.ModelProto):
        return source, source.ByteSize()
    return load_model(source)


def _label(source: str | os.PathLike | onnx.ModelProto) -> str:
    return "<in-memory model>" if isinstance(source, onnx.ModelProto) else str(source)
