"""Calibration statistics of each weight's layer, collected in onnxruntime batch by batch (docs/method.md, section 4).

For a weight read as the matrix ``W`` of ``rows x cols`` (``moveaxis(W, row_axis, 0).reshape(rows, cols)``, rows are
output neurons, see :mod:`jlcm_onnx.ir.weight_sites`), the consumer computes ``y = W @ x`` for every position's
input vector ``x`` (of length ``cols``). Stacking the ``N`` vectors as ``X`` [cols, N], the layer objective of an
approximation ``W^`` is::

    L(W^) = || (W - W^) X ||_F^2 = tr(ΔW H ΔW^T),   ΔW = W - W^,   H = X X^T = sum_x x x^T   [cols, cols]

so ``H`` replaces the activations, and ``diag(H) / N`` is the mean square of each input column, a cheap per-column
sensitivity. Each batch's ``H`` is a float32 product, the precision of the activations themselves (within ~1e-6 of
float64's, far below the damping the learning adds, at half float64's time); the batches are summed in float64. What
``x`` is for each kind of consumer (MatMul, Gemm, Conv, Gather, a tied head) is in
:mod:`jlcm_onnx.analysis.activation_inputs`.

A weight read by several nodes gets the sum of their statistics (the objective sums their output errors). Weights whose
consumers read the same activation the same way (Q, K and V projections reading one LayerNorm output) share one Gram,
computed once per batch and returned as one read-only array.

Sequential mode: statistics are located by the consumers' *data input* tensors (``A`` of MatMul, ``X`` of Conv, the
indices of Gather), which the encoder keeps when it replaces a weight by a decode subgraph (it may even replace the
consumer node itself, for a blocked MatMul or a row-decoding Gather, but not the activation it reads). So compute the
:func:`activation_inputs` once on the ORIGINAL model and pass them to :func:`collect_statistics` of the partially
compressed one::

    inputs = activation_inputs(original, names)
    stats = collect_statistics(partially_compressed, names, feeds, inputs=inputs)

Memory: a model above :data:`~jlcm_onnx.ir.segmented_run.SEGMENT_BYTES` of weights runs a segment of its nodes at a
time, every batch through one segment before the next (:func:`~jlcm_onnx.ir.segmented_run.segment_values`), and each
Gram of at least :data:`SPILL_MIN_BYTES` moves to an unnamed temporary file (memory-mapped) as soon as its segment
has seen the last batch: a 1.5B-parameter decoder's Grams hold 18 GB in float64 (a 8,960-wide MLP input is 0.64 GB),
which then live on disk and come into memory one tensor's at a time, while it is encoded. Otherwise one onnxruntime
run per batch returns only the needed activations (the copy's graph outputs are replaced by
them, and the nodes they do not depend on are left out); they are reduced into the Grams and dropped before the next
batch is read, so the peak is one batch of activations plus the Grams. :func:`batch_size` joins at most
``MAX_BATCH`` samples and at most ``BATCH_ACTIVATION_BYTES`` of activations (estimated from the inferred shapes with
the first sample's sizes) into one batch: a 268M-parameter LLM returns 80 MB of activations per sample of 256
tokens. Feeds may be a generator.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

from jlcm_onnx.analysis.activation_inputs import ActivationInput, GatherInput, WeightActivations, activation_inputs
from jlcm_onnx.ir.model_skeleton import session_with_weights, skeleton
from jlcm_onnx.ir.segmented_run import SEGMENT_BYTES, plan_segments, segment_values, weight_bytes
from jlcm_onnx.ir.sessions import session_options
from jlcm_onnx.progress import Phase

#: Calibration samples joined into one onnxruntime run, at most, and the activations such a run may return.
MAX_BATCH, BATCH_ACTIVATION_BYTES = 16, 256 << 20
#: Sums collected a segment at a time are moved to temporary files once final when they are at least this large.
SPILL_MIN_BYTES = 16 << 20


@dataclass
class LayerStatistics:
    """What the layer objective of one weight needs, in the layout of the encoder's matrix (rows = output neurons).

    Attributes:
        gram: ``H = sum_x x x^T`` in float64, [cols, cols] (column order of ``moveaxis(W, row_axis, 0).reshape(rows,
            -1)``), or [groups, cols, cols] for a grouped Conv (row ``r`` uses ``gram[r // (rows // groups)]``);
            ``None`` for embedding tables and weights without statistics. May be shared with other weights: read-only.
        token_counts: for a weight read by ``Gather``, how often each row was looked up (int64, [rows]); else ``None``.
        count: number of input vectors accumulated into ``gram`` (positions, im2col columns; per group for a grouped
            Conv), or of lookups when there is only ``token_counts``.
        note: why statistics are missing, or what was left out; empty when everything was collected.
    """

    gram: np.ndarray | None
    token_counts: np.ndarray | None
    count: int
    note: str = ""

    @property
    def available(self) -> bool:
        """True when a Gram or token counts were collected."""
        return self.gram is not None or self.token_counts is not None

    @property
    def mean_square(self) -> np.ndarray | None:
        """``diag(H) / count``: the mean square of each input column ([cols], or [groups, cols] for a grouped Conv)."""
        if self.gram is None:
            return None
        return np.diagonal(self.gram, axis1=-2, axis2=-1) / max(self.count, 1)

    def importance(self, rows: int) -> np.ndarray | None:
        """``diag(H) / N`` of each weight's input column, for every one of ``rows`` output rows ([rows, cols]; per conv
        group block for a grouped Conv), floored at 1e-12 of the largest so no weight is ignored; None without a
        Gram. The weights of the encoder's importance-weighted k-means."""
        mean_square = self.mean_square
        if mean_square is None:
            return None
        blocks = mean_square.reshape(-1, mean_square.shape[-1])
        floored = blocks + 1e-12 * float(blocks.max(initial=1.0))
        if floored.shape[0] == 1:  # a read-only view: encoders copy only the rows they work on
            return np.broadcast_to(floored, (rows, floored.shape[1]))
        return np.repeat(floored, rows // floored.shape[0], axis=0)

    @property
    def conv_groups(self) -> int:
        """Number of per-group Grams (1 unless the weight is a grouped Conv's)."""
        return 1 if self.gram is None or self.gram.ndim == 2 else self.gram.shape[0]


# ------------------------------------------------------------------------------------------- how a consumer reads x


def batch_size(model: onnx.ModelProto, weights: Iterable[str], sample: Mapping[str, np.ndarray]) -> int:
    """Calibration samples per onnxruntime run (see the module docstring): ``MAX_BATCH``, fewer when the activations
    the weights' statistics read would pass ``BATCH_ACTIVATION_BYTES``."""
    tensors = {i.tensor for entry in activation_inputs(model, weights).values() for i in entry.inputs}
    per_sample = activation_bytes(model, tensors, sample)
    return int(np.clip(BATCH_ACTIVATION_BYTES // max(per_sample, 1), 1, MAX_BATCH))


def activation_bytes(model: onnx.ModelProto, tensors: set[str], sample: Mapping[str, np.ndarray]) -> int:
    """Bytes of the values of ``tensors`` when ``model`` runs on ``sample``, from the shapes onnx infers: a symbolic
    dim of a graph input takes the sample's size, any other unknown dim the sample's largest size; a tensor of unknown
    rank counts as nothing, and so does every tensor of a model onnx cannot infer shapes for."""
    try:
        graph = onnx.shape_inference.infer_shapes(skeleton(model)).graph
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        return 0
    bound: dict[str, int] = {}
    for value in graph.input:
        if value.name in sample:
            for dim, size in zip(value.type.tensor_type.shape.dim, np.shape(sample[value.name]), strict=False):
                if dim.dim_param:
                    bound[dim.dim_param] = size
    largest = max((size for array in sample.values() for size in np.shape(array)), default=1)
    total, counted = 0, set()
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.name not in tensors or value.name in counted or not value.type.tensor_type.HasField("shape"):
            continue
        counted.add(value.name)
        sizes = [d.dim_value if d.HasField("dim_value") else bound.get(d.dim_param, largest)
                 for d in value.type.tensor_type.shape.dim]
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).itemsize
        total += int(np.prod(sizes, dtype=np.int64)) * itemsize
    return total


# ---------------------------------------------------------------------------------------------------- collection


@dataclass
class _Sum:
    total: torch.Tensor | None = None
    count: int = 0
    result: np.ndarray | None = field(default=None, repr=False)

    def add(self, value: torch.Tensor, count: int) -> None:
        """Adds one batch's sum (a float32 Gram is summed in float64, counts as they are)."""
        if self.total is None:
            self.total = value.to(torch.float64) if value.is_floating_point() else value
        else:
            self.total.add_(value)
        self.count += count

    def array(self) -> np.ndarray | None:
        """The final sum as a read-only array (Grams symmetrised), built once and shared."""
        if self.total is not None:
            total = self.total
            if total.dtype == torch.float64:
                total = (total + total.transpose(-1, -2)) / 2
                if total.ndim == 3 and total.shape[0] == 1:
                    total = total[0]  # a conv with one group: a plain [cols, cols] Gram
            self.result, self.total = total.numpy(), None
            self.result.flags.writeable = False
        return self.result

    def spill(self) -> None:
        """Moves the finished sum, when at least :data:`SPILL_MIN_BYTES`, to an unnamed temporary file that it is then
        read from (memory-mapped, read-only): its pages are in memory only while a reader touches them. The values
        are the same bytes."""
        array = self.array()
        if array is None or array.nbytes < SPILL_MIN_BYTES or isinstance(array, np.memmap):
            return
        with tempfile.TemporaryFile(prefix="jlcm-gram-") as file:  # unlinked already: gone with the last mapping
            array.tofile(file)
            file.flush()
            self.result = np.memmap(file, array.dtype, mode="r", shape=array.shape)


def collect_statistics(
    model: onnx.ModelProto,
    weights: Iterable[str],
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    inputs: Mapping[str, WeightActivations] | None = None,
    providers: list[str] | None = None,
    progress: bool = False,
    mask: str | None = None,
) -> dict[str, LayerStatistics]:
    """Runs ``model`` in onnxruntime on every feed and returns the :class:`LayerStatistics` of each weight.

    Args:
        model: the model to run (not modified); in sequential mode, the partially compressed one.
        weights: names of the weights (weight sites of the original model).
        feeds: batches, each a dict of model input name -> array; read once, one at a time (a generator is fine).
        inputs: the weights' :class:`WeightActivations` from :func:`activation_inputs` on the original model; weights
            missing from it are looked up in ``model`` itself (fine while they are still initializers there).
        providers: onnxruntime execution providers (default CPU).
        progress: show a progress bar over batches.
        mask: the feed input whose zero positions are padding (an attention mask): left out of every Gram and token
            count whose activation's leading axes are those positions.

    Example (all-MiniLM-L6-v2, 128 sentences in 8 padded batches of 16; ``val_60`` is a query projection)::

        >>> stats = collect_statistics(model, ["val_60", "bert.embeddings.word_embeddings.weight"], feeds)
        >>> stats["val_60"].gram.shape, stats["val_60"].count
        ((384, 384), 5472)
        >>> int(stats["bert.embeddings.word_embeddings.weight"].token_counts.sum())
        5472
    """
    names = list(dict.fromkeys(weights))
    given = dict(inputs or {})
    missing = [name for name in names if name not in given]
    plan = {**activation_inputs(model, missing), **{name: given[name] for name in names if name in given}}
    available = _tensor_names(model.graph)
    for name, entry in plan.items():
        absent = sorted({i.tensor for i in entry.inputs if i.tensor not in available})
        if absent:
            plan[name] = WeightActivations((), f"activation(s) {', '.join(absent)} not found in this model")
    sums = {i: _Sum() for entry in plan.values() for i in entry.inputs}
    if sums:
        _accumulate(model, sums, feeds, providers, progress, mask)
    return {name: _statistics(plan[name], sums) for name in names}


def _accumulate(
    model: onnx.ModelProto,
    sums: dict[ActivationInput, _Sum],
    feeds: Iterable[dict[str, np.ndarray]],
    providers: list[str] | None,
    progress: bool,
    mask: str | None,
) -> None:
    tensors = list(dict.fromkeys(i.tensor for i in sums))
    readers = defaultdict(list)
    for activation in sums:
        readers[activation.tensor].append(activation)
    if weight_bytes(model) > SEGMENT_BYTES:
        _accumulate_in_segments(model, tensors, readers, sums, list(feeds), providers, progress, mask)
        return
    session, weights = _session(model, tensors, providers)  # weights: the arrays behind the session's initializers
    total = len(feeds) if hasattr(feeds, "__len__") else None
    with Phase("statistics", total=total, enabled=progress) as phase:
        for feed in feeds:
            real = None if mask is None else np.asarray(feed[mask]) != 0
            _reduce_batch(dict(zip(tensors, session.run(tensors, feed), strict=True)), readers, sums, real)
            phase.advance()  # the batch's activations are dropped before the next is read


def _accumulate_in_segments(
    model: onnx.ModelProto,
    tensors: list[str],
    readers: dict[str, list[ActivationInput]],
    sums: dict[ActivationInput, _Sum],
    feeds: list[dict[str, np.ndarray]],
    providers: list[str] | None,
    progress: bool,
    mask: str | None,
) -> None:
    """The statistics of a model above :data:`~jlcm_onnx.ir.segmented_run.SEGMENT_BYTES`, a segment of its nodes at a
    time (:func:`~jlcm_onnx.ir.segmented_run.segment_values`), every batch through each segment: one segment's weights
    in memory. Each sum still adds its batches in feed order, so the statistics are those of the whole-model run."""
    reals = [None if mask is None else np.asarray(feed[mask]) != 0 for feed in feeds]
    steps = len(plan_segments(model.graph, SEGMENT_BYTES, tensors)) * len(feeds)
    with Phase("statistics (a segment of the model at a time)", total=steps, enabled=progress) as phase:
        for index, values in segment_values(model, feeds, tensors, SEGMENT_BYTES, session_options,
                                            providers or ["CPUExecutionProvider"]):
            _reduce_batch(values, readers, sums, reals[index])
            if index == len(feeds) - 1:  # the last batch through this segment: its activations' sums are final
                for tensor in values:
                    for reader in readers[tensor]:
                        sums[reader].spill()
            phase.advance()


def _reduce_batch(
    activations: dict[str, np.ndarray],
    readers: dict[str, list[ActivationInput]],
    sums: dict[ActivationInput, _Sum],
    real: np.ndarray | None = None,
) -> None:
    for tensor, activation in activations.items():
        for reader in readers[tensor]:
            sums[reader].add(*reader.reduce(activation, real))


def _session(
    model: onnx.ModelProto, tensors: list[str], providers: list[str] | None
) -> tuple[ort.InferenceSession, list[np.ndarray]]:
    """A session of ``model`` whose outputs are exactly ``tensors`` (so nothing else is computed), built without a
    serialized copy of the weights (:func:`~jlcm_onnx.ir.model_skeleton.session_with_weights`); the weights' arrays
    must outlive it."""
    types = _elem_types(model.graph)
    outputs = []
    for name in tensors:
        value = onnx.ValueInfoProto(name=name)
        if name in types:
            value.type.tensor_type.elem_type = types[name]
        outputs.append(value)
    return session_with_weights(model, session_options(), providers or ["CPUExecutionProvider"], outputs)


def _statistics(entry: WeightActivations, sums: dict[ActivationInput, _Sum]) -> LayerStatistics:
    grams = [sums[i] for i in entry.inputs if not isinstance(i, GatherInput)]
    counts = [sums[i] for i in entry.inputs if isinstance(i, GatherInput)]
    gram, count = _combine(grams)
    token_counts, lookups = _combine(counts)
    if gram is None and token_counts is None and not entry.note:
        return LayerStatistics(None, None, 0, "no batches were given")
    return LayerStatistics(gram, token_counts, count if gram is not None else lookups, entry.note)


def _combine(parts: list[_Sum]) -> tuple[np.ndarray | None, int]:
    """The sum over a weight's consumers (the shared array itself when there is one)."""
    parts = [part for part in parts if part.array() is not None]
    if not parts:
        return None, 0
    if len(parts) == 1:
        return parts[0].array(), parts[0].count
    if len({part.array().shape for part in parts}) > 1:
        raise ValueError(f"consumers of one weight give statistics of shapes {[p.array().shape for p in parts]}")
    return np.sum([part.array() for part in parts], axis=0), sum(part.count for part in parts)


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    return names | {output for node in graph.node for output in node.output}


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element types known without shape inference (value_info, inputs, outputs, initializers)."""
    types = {t.name: t.data_type for t in graph.initializer}
    for value in (*graph.value_info, *graph.input, *graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types
