"""How each consumer of a weight reads its activation ``x``, the input vector of the layer's ``y = W @ x``: one
:class:`ActivationInput` per consumer kind reduces a batch of the consumer's data input to the Gram
``H = sum_x x x^T`` (or to row lookup counts) that :mod:`jlcm_onnx.analysis.statistics` sums. Per kind:

- ``MatMul(A, W)``, W [in, out] (row_axis 1, cols = in): ``x`` is a row of ``A`` flattened over its leading axes,
  ``A.reshape(-1, in)``. Weights of rank > 2 (batched MatMul) are not handled.
- ``Gemm(A, W)``: ``x`` is a row of ``A`` (``A^T`` when ``transA=1``); ``transB`` only moves W's row axis, cols is the
  contracted axis K either way. ``alpha`` scales every output of the layer equally and is left out of ``H``.
- ``Conv(X, W)``, W [C_out, C_in/groups, *kernel] (row_axis 0, cols = C_in/groups * prod(kernel), ordered channel
  first then kernel positions, exactly W's memory order): ``x`` is an im2col column, the zero-padded input window of one
  output position (kernel, strides, pads or auto_pad, dilations honoured; 1-D, 2-D and 3-D alike). Output channels of
  conv group ``g`` only see input channels of group ``g``, so a grouped conv (depthwise included) gets one Gram per
  group: ``gram`` has shape [groups, cols, cols] and output row ``r`` uses ``gram[r // (rows // groups)]``. A conv with
  one group gets a plain [cols, cols] Gram.
- ``Gather(W, indices)`` (embedding tables): no product, so ``token_counts[r]`` counts how often row ``r`` (along the
  gather axis, W's row axis) was looked up; weigh each row's error by it (or use plain weight MSE).
- ``MatMul(A, Transpose(W))`` (a language-model head tied to the embedding table): ``A @ W^T`` reads W with its rows
  (axis 0) as outputs, like ``Gemm`` with ``transB=1``; ``x`` is a row of ``A``.
- ``ConvTranspose``, batched MatMul weights, and weights read inside ``If``/``Loop``/``Scan`` bodies: no statistics
  (``None``, with the reason in ``note``). Body activations are not graph outputs that onnxruntime can return.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from jlcm_onnx.analysis.calibration import at_real_positions, real_rows
from jlcm_onnx.config import DATA_READERS
from jlcm_onnx.ir.weight_sites import Consumer, WeightSite, find_weight_sites, transposed_matmul, weight_row_axis

#: Activations are turned into float64 matrices in chunks of at most this many elements (64 MB).
CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class ActivationInput:
    """One consumer's data input, and how it turns into the vectors ``x`` of the layer objective.

    Equal inputs (same tensor, read the same way) are computed once. Subclasses reduce one batch of the tensor.
    """

    tensor: str

    def reduce(self, activation: np.ndarray, real: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
        """(this batch's float32 Gram [cols, cols] or [groups, cols, cols], or int64 counts; how many vectors or
        lookups it holds). ``real`` (bool, the feed's mask ``!= 0``, e.g. [batch, sequence]) marks the positions that
        count, where the activation's leading axes are those positions."""
        raise NotImplementedError


@dataclass(frozen=True)
class RowInput(ActivationInput):
    """MatMul ``A`` / Gemm ``A``: ``x`` runs over the rows of ``A.reshape(-1, cols)`` (of ``A^T`` when transposed)."""

    cols: int
    transposed: bool = False

    def reduce(self, activation: np.ndarray, real: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
        rows = activation.T if self.transposed else activation.reshape(-1, self.cols)
        if rows.shape[-1] != self.cols:
            raise ValueError(f"activation '{self.tensor}' has shape {activation.shape}, expected {self.cols} columns")
        picked = None if self.transposed else real_rows(activation, real)  # masked rows are picked chunk by chunk
        count = rows.shape[0] if picked is None else picked.size
        gram = torch.zeros(self.cols, self.cols)
        step = max(1, CHUNK_ELEMENTS // self.cols)
        for start in range(0, count, step):
            part = rows[start:start + step] if picked is None else rows[picked[start:start + step]]
            chunk = torch.from_numpy(np.asarray(part, dtype=np.float32))
            gram.addmm_(chunk.T, chunk)
        return gram, count


@dataclass(frozen=True)
class ConvInput(ActivationInput):
    """Conv ``X`` [N, C_in, *spatial]: ``x`` runs over the im2col columns of each conv group."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    groups: int
    auto_pad: str = "NOTSET"

    def reduce(self, activation: np.ndarray, real: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
        samples, channels = activation.shape[:2]  # image positions are all real
        cols = channels // self.groups * int(np.prod(self.kernel))
        gram = torch.zeros(self.groups, cols, cols)
        per_sample = channels * int(np.prod(self.kernel)) * int(np.prod(activation.shape[2:]))
        step = max(1, CHUNK_ELEMENTS // max(per_sample, 1))
        count = 0
        for start in range(0, samples, step):
            columns = self.im2col(torch.from_numpy(np.ascontiguousarray(activation[start:start + step])))
            grouped = columns.to(torch.float32).reshape(columns.shape[0], self.groups, cols).transpose(0, 1)
            gram.baddbmm_(grouped.transpose(1, 2), grouped)
            count += columns.shape[0]
        return gram, count

    def im2col(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, *spatial] -> [N * output positions, C * prod(kernel)], columns ordered (channel, kernel position)."""
        spatial = x.shape[2:]
        begin, end = self._padding(spatial)
        pad = [p for axis in reversed(range(len(spatial))) for p in (begin[axis], end[axis])]
        x = F.pad(x, pad)
        for axis, (size, stride, dilation) in enumerate(zip(self.kernel, self.strides, self.dilations, strict=True)):
            x = x.unfold(2 + axis, (size - 1) * dilation + 1, stride)[..., ::dilation]
        # x: [N, C, *out, *kernel] -> [N, *out, C, *kernel]
        rank = len(spatial)
        x = x.permute(0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
        return x.reshape(-1, x.shape[1 + rank] * int(np.prod(self.kernel)))

    def _padding(self, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
        rank = len(spatial)
        if self.auto_pad == "VALID":
            return [0] * rank, [0] * rank
        if self.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            return list(self.pads[:rank]), list(self.pads[rank:])
        begin, end = [], []
        for size, kernel, stride, dilation in zip(spatial, self.kernel, self.strides, self.dilations, strict=True):
            out = -(-size // stride)
            total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if self.auto_pad == "SAME_UPPER" else large)
            end.append(total - begin[-1])
        return begin, end


@dataclass(frozen=True)
class GatherInput(ActivationInput):
    """Gather ``indices``: counts of each of the table's ``rows`` looked up (negative indices count from the end)."""

    rows: int

    def reduce(self, activation: np.ndarray, real: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
        indices = at_real_positions(activation[..., None], real).astype(np.int64, copy=False).ravel()
        indices = np.where(indices < 0, indices + self.rows, indices)
        return torch.from_numpy(np.bincount(indices, minlength=self.rows)[: self.rows]), indices.size


@dataclass(frozen=True)
class WeightActivations:
    """The data inputs of one weight's consumers (empty when it gets no statistics) and the reason for what is not."""

    inputs: tuple[ActivationInput, ...]
    note: str = ""


def activation_inputs(model: onnx.ModelProto, weights: Iterable[str]) -> dict[str, WeightActivations]:
    """For each weight name, the data inputs of its consumers in ``model`` (the original, uncompressed model).

    The consumers define the output rows the same way as the encoder (the first consumer with a weight role sets the
    row axis; consumers that read the weight along another axis are left out and named in the note).
    """
    sites = {site.name: site for site in find_weight_sites(model)}
    return {name: _weight_activations(sites.get(name), model.graph) for name in weights}


def _weight_activations(site: WeightSite | None, main: onnx.GraphProto) -> WeightActivations:
    if site is None:
        return WeightActivations((), "not a float weight of this model")
    if site.graph is not main or any(c.graph is not main for c in site.consumers):
        return WeightActivations((), "read inside an If/Loop/Scan body: its activations are not graph outputs")
    roles = [(c, weight_row_axis(c, site.shape), site.shape) for c in site.consumers]
    roles = [(c, axis, shape) for c, axis, shape in roles if axis is not None]
    if not roles:
        return WeightActivations((), "no MatMul/Gemm/Conv/ConvTranspose/Gather reads it as a weight")
    row_axis = roles[0][1]
    if len(site.shape) == 2:
        roles += [(matmul, 0, site.shape[::-1]) for matmul in filter(None, map(transposed_matmul, site.consumers))]
    inputs, notes = [], []
    for consumer, axis, shape in roles:
        if axis != row_axis:
            notes.append(f"{consumer.describe()} reads it along axis {axis}, not {row_axis}: left out")
            continue
        entry = _activation_input(consumer, shape)
        if isinstance(entry, str):
            notes.append(f"{consumer.describe()}: {entry}")
        else:
            inputs.append(entry)
    return WeightActivations(tuple(inputs), "; ".join(notes))


def _activation_input(consumer: Consumer, shape: tuple[int, ...]) -> ActivationInput | str:
    """What ``consumer`` reads as ``x``, or why it has no statistics."""
    node = consumer.node
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        if len(shape) != 2:
            return f"batched MatMul weight of shape {list(shape)} is not handled"
        return RowInput(node.input[0], shape[0])
    if node.op_type == "Gemm":
        cols = shape[1] if attributes.get("transB", 0) else shape[0]
        return RowInput(node.input[0], cols, transposed=bool(attributes.get("transA", 0)))
    if node.op_type == "Conv":
        rank = len(shape) - 2
        auto_pad = attributes.get("auto_pad", b"NOTSET")
        return ConvInput(
            node.input[0],
            kernel=tuple(shape[2:]),
            strides=tuple(attributes.get("strides", [1] * rank)),
            pads=tuple(attributes.get("pads", [0] * 2 * rank)),
            dilations=tuple(attributes.get("dilations", [1] * rank)),
            groups=int(attributes.get("group", 1)),
            auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad,
        )
    if node.op_type == "Gather":
        axis = int(attributes.get("axis", 0)) % len(shape)
        return GatherInput(node.input[1], shape[axis])
    if node.op_type in DATA_READERS:
        return f"{node.op_type} reads it as data, not as a weight of a product: fitted to the weights alone"
    return f"{node.op_type} statistics are not collected"
