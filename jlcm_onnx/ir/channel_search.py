"""The search for the tensors that carry a permutation ``P`` of a weight's output channels (the invariances it relies
on are in :mod:`jlcm_onnx.ir.permute_channels`).

So ``find_channel_path`` collects the set of tensors that carry ``P``: it starts at the output of the weight's consumer
and follows it forward through channel-wise ops to the contracting consumers. Where two non-constant tensors meet in an
elementwise op (``x * sigmoid(x)``, the gated FFN ``up * act(gate)``), the other one must carry ``P`` too: it is
followed backward through elementwise ops to a *sibling* MatMul/Gemm/Conv reading the same input, whose rows are
permuted by the same ``P``. Anything else (a residual Add with an unpermuted tensor, Concat, Transpose, Softmax, a graph
output, a subgraph reader, a tensor shared with a node off the path, an unknown op) blocks the path with a one-line
reason.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx

from jlcm_onnx.ir.graph_index import ONNX_DOMAINS, Blocked, GraphIndex, describe_node

#: Ops that act elementwise (with broadcasting) on all their inputs, so every output carries the permutation.
ELEMENTWISE = frozenset({
    "Abs", "Add", "Cast", "Celu", "Clip", "Cos", "Div", "Dropout", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "LeakyRelu", "Log", "Max", "Mean", "Min", "Mish", "Mul", "Neg", "Pow", "PRelu",
    "Reciprocal", "Relu", "Selu", "Sigmoid", "Sin", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tanh",
    "ThresholdedRelu", "Where",
})


#: Microsoft-domain Gelu variants (``FastGelu``/``BiasGelu`` add a bias broadcast along the last axis).
MICROSOFT_ELEMENTWISE = frozenset({"Gelu", "FastGelu", "BiasGelu"})


POOLS = frozenset({"AveragePool", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "LpPool", "MaxPool"})


RESHAPES = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze"})


CONTRACTIONS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})




@dataclass(frozen=True)
class ChannelPath:
    """What to permute so that permuting ``weight``'s ``channels`` output rows leaves the model's outputs unchanged.

    ``permuted[i] = (name, axis)``: the initializer or ``Constant`` ``name`` is permuted along ``axis`` in channel-major
    blocks of ``blocks[i]`` (1 for a plain per-channel axis). The first entry is ``weight`` along its row axis.
    ``contractions`` names the nodes (``op:name``) where the permutation is absorbed.
    """

    weight: str
    channels: int
    permuted: tuple[tuple[str, int], ...]
    blocks: tuple[int, ...]
    contractions: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.blocks) != len(self.permuted):
            raise ValueError(f"{len(self.permuted)} permuted tensors but {len(self.blocks)} block sizes")


class ChannelSearch:
    """Grows the set of tensors that carry the permutation from the output of the weight's consumer ``start``.

    Each tensor is carried with its channel axis (negative, so that broadcasting aligns it) and block size. A node is
    visited once, in one role: ``rows`` (its weight rows are permuted: the start node or a sibling reading the same
    input), ``channel-wise`` (it passes the permutation on) or ``contraction`` (its input channels absorb it).
    """

    def __init__(self, index: GraphIndex, start: int, channels: int) -> None:
        self.index = index
        self.start = index.nodes[start]
        self.channels = channels
        self.carried: dict[str, tuple[int, int]] = {}
        self.via: dict[str, onnx.NodeProto] = {}
        self.permuted: dict[str, tuple[int, int]] = {}
        self.roles: dict[int, str] = {}
        self.contractions: list[str] = []
        self.queue: deque[str] = deque()

    def run(self, weight: str) -> ChannelPath:
        *_, output_axis = self._row_layout(self.start)
        self._carry(self.start.output[0], output_axis, 1, self.start)
        while self.queue:
            name = self.queue.popleft()
            self._visit_producer(name)
            for position, input_index in self.index.consumers.get(name, []):
                self._visit_consumer(position, input_index, name)
        if not self.contractions:
            raise Blocked(f"no MatMul/Gemm/Conv contracts over the output channels of {weight}")
        for name in self.permuted:
            off_path = [p for p in self.index.readers(name) if p not in self.roles]
            if off_path:
                raise Blocked(f"{name} is shared with {describe_node(self.index.nodes[off_path[0]])}, off the path")
            if name in self.index.outputs:
                raise Blocked(f"{name} is a graph output")
        return ChannelPath(
            weight=weight,
            channels=self.channels,
            permuted=tuple((name, axis) for name, (axis, _) in self.permuted.items()),
            blocks=tuple(block for _, block in self.permuted.values()),
            contractions=tuple(self.contractions),
        )

    # -------------------------------------------------------------------------------------------------- tensors

    def _carry(self, name: str, axis: int, block: int, node: onnx.NodeProto) -> None:
        """Marks ``name`` (an input or output of ``node``) as carrying the permutation on ``axis``."""
        if name in self.carried:
            if self.carried[name] != (axis, block):
                raise Blocked(f"{describe_node(node)}: {name} would carry the permutation on two different axes")
            return
        if name in self.index.outputs:
            raise Blocked(f"{name} (from {describe_node(node)}) is a graph output")
        if name in self.index.nested_readers:
            reader = self.index.nodes[self.index.nested_readers[name][0]]
            raise Blocked(f"{name} is read inside the subgraph of {describe_node(reader)}")
        self.carried[name] = (axis, block)
        self.via[name] = node
        self.queue.append(name)

    def _permute(self, name: str, axis: int, block: int, node: onnx.NodeProto) -> None:
        """Marks the constant ``name`` (read by ``node``) to be permuted along its ``axis``."""
        shape = self.index.constant_shape(name, node)
        if not 0 <= axis < len(shape) or shape[axis] != self.channels * block:
            raise Blocked(f"{describe_node(node)}: {name} of shape {list(shape)} has no axis of "
                           f"{self.channels * block} channels at {axis}")
        if self.permuted.setdefault(name, (axis, block)) != (axis, block):
            raise Blocked(f"{describe_node(node)}: {name} would be permuted along two different axes")

    def _broadcast_input(self, name: str, axis: int, block: int, node: onnx.NodeProto) -> None:
        """An input of ``node`` broadcast against an output that carries the permutation on ``axis``."""
        shape = self.index.shapes.get(name)
        if name in self.carried or shape is None:
            self._carry(name, axis, block, node)
        elif len(shape) < -axis or shape[axis] == 1:
            return  # broadcast along the channel axis: the same for every channel
        elif name in self.index.constants:
            self._permute(name, len(shape) + axis, block, node)
        else:
            self._carry(name, axis, block, node)

    # ---------------------------------------------------------------------------------------------------- nodes

    def _visit_producer(self, name: str) -> None:
        position = self.index.producers.get(name)
        if position is None:
            raise Blocked(f"{describe_node(self.via[name])} joins graph input {name}, which does not carry the "
                           f"permutation (residual or unpermuted branch)")
        role = self.roles.get(position)
        node = self.index.nodes[position]
        if role == "contraction":
            raise Blocked(f"{describe_node(node)} both reads and produces the permuted channels")
        if role is not None:
            return
        if _is_elementwise(node):
            self._elementwise(position, *self.carried[name])
        elif node is self.start or (node.op_type in CONTRACTIONS and node.input[0] == self.start.input[0]):
            self._rows(position)
        else:
            raise Blocked(f"{describe_node(self.via[name])} joins {name} (from {describe_node(node)}), which does not "
                          f"carry the permutation (residual or unpermuted branch)")

    def _visit_consumer(self, position: int, input_index: int, name: str) -> None:
        role = self.roles.get(position)
        node = self.index.nodes[position]
        if role == "channel-wise":
            return
        if role is not None:
            raise Blocked(f"{describe_node(node)} reads the permuted channels of {name} but is already on the path "
                           f"as {role}")
        axis, block = self.carried[name]
        op = node.op_type
        if _is_elementwise(node):
            self._elementwise(position, axis, block)
        elif node.domain not in ONNX_DOMAINS or input_index != 0:
            raise Blocked(f"{describe_node(node)} reads {name} as input {input_index}, not as channel-wise data")
        elif op == "Conv" and _group(node) > 1:
            self._depthwise(position, axis, block)
        elif op in CONTRACTIONS:
            self._contraction(position, axis, block)
        elif op == "BatchNormalization":
            self._batch_norm(position, axis, block)
        elif op == "LayerNormalization":
            self._layer_norm(position, axis, block)
        elif op in POOLS:
            self._pool(position, axis, block)
        elif op in RESHAPES:
            self._reshape(position, axis, block)
        else:
            raise Blocked(f"{describe_node(node)} reads {name} across its channels ({op} is not channel-wise)")

    def _row_layout(self, node: onnx.NodeProto) -> tuple[str, int, int]:
        """(weight, its output-row axis, the output's channel axis) of a MatMul/Gemm/Conv/ConvTranspose."""
        weight = node.input[1]
        rank = len(self.index.constant_shape(weight, node))
        if node.op_type == "MatMul":
            if rank < 2:
                raise Blocked(f"{describe_node(node)}: a 1-D weight has no output rows")
            return weight, rank - 1, -1
        if node.op_type == "Gemm":
            return weight, 0 if _attributes(node).get("transB", 0) else 1, -1
        if _group(node) != 1:
            raise Blocked(f"{describe_node(node)} is a grouped convolution: its rows are tied to its input channels")
        return weight, 0 if node.op_type == "Conv" else 1, 1 - rank

    def _rows(self, position: int) -> None:
        node = self.index.nodes[position]
        self.roles[position] = "rows"
        weight, weight_axis, output_axis = self._row_layout(node)
        self._permute(weight, weight_axis, 1, node)
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and node.op_type == "Gemm":
            self._broadcast_input(bias, -1, 1, node)
        elif bias:
            self._permute(bias, 0, 1, node)
        self._carry(node.output[0], output_axis, 1, node)

    def _contraction(self, position: int, axis: int, block: int) -> None:
        node = self.index.nodes[position]
        self.roles[position] = "contraction"
        weight = node.input[1]
        rank = len(self.index.constant_shape(weight, node))
        attributes = _attributes(node)
        if node.op_type == "MatMul":
            expected, weight_axis = -1, max(rank - 2, 0)
        elif node.op_type == "Gemm":
            expected = -2 if attributes.get("transA", 0) else -1
            weight_axis = 1 if attributes.get("transB", 0) else 0
        else:
            expected, weight_axis = 1 - rank, 1 if node.op_type == "Conv" else 0
            if _group(node) != 1:
                raise Blocked(f"{describe_node(node)} is a grouped convolution")
        if axis != expected:
            raise Blocked(f"{describe_node(node)} contracts over axis {expected}, the channels are on axis {axis}")
        self._permute(weight, weight_axis, block, node)
        self.contractions.append(describe_node(node))

    def _elementwise(self, position: int, axis: int, block: int) -> None:
        node = self.index.nodes[position]
        self.roles[position] = "channel-wise"
        for name in node.input:
            if name:
                self._broadcast_input(name, axis, block, node)
        for name in node.output:
            if name:
                self._carry(name, axis, block, node)

    def _depthwise(self, position: int, axis: int, block: int) -> None:
        node = self.index.nodes[position]
        self.roles[position] = "channel-wise"
        shape = self.index.constant_shape(node.input[1], node)
        if _group(node) != shape[0] or shape[1] != 1:
            raise Blocked(f"{describe_node(node)} is a grouped (not depthwise) convolution")
        if axis != 1 - len(shape):
            raise Blocked(f"{describe_node(node)} convolves axis 1, the channels are on axis {axis}")
        self._permute(node.input[1], 0, block, node)
        if len(node.input) > 2 and node.input[2]:
            self._permute(node.input[2], 0, block, node)
        self._carry(node.output[0], axis, block, node)

    def _batch_norm(self, position: int, axis: int, block: int) -> None:
        node = self.index.nodes[position]
        self.roles[position] = "channel-wise"
        if axis != 1 - self.index.rank(node.input[0], node):
            raise Blocked(f"{describe_node(node)} normalizes axis 1, the channels are on axis {axis}")
        if any(self.index.is_read(name) for name in node.output[1:] if name):
            raise Blocked(f"{describe_node(node)} is in training mode (running statistics are read)")
        for name in node.input[1:5]:
            self._permute(name, 0, block, node)
        self._carry(node.output[0], axis, block, node)

    def _layer_norm(self, position: int, axis: int, block: int) -> None:
        node = self.index.nodes[position]
        self.roles[position] = "channel-wise"
        normalized = int(_attributes(node).get("axis", -1))
        if normalized >= 0:
            normalized -= self.index.rank(node.input[0], node)
        if normalized != -1 or axis != -1:
            raise Blocked(f"{describe_node(node)} normalizes axes {normalized}.., not exactly the channel axis {axis}")
        for name in node.input[1:3]:
            if name:
                self._broadcast_input(name, axis, block, node)
        self._carry(node.output[0], axis, block, node)  # outputs 1, 2 (mean, inverse std) are invariant

    def _pool(self, position: int, axis: int, block: int) -> None:
        node = self.index.nodes[position]
        self.roles[position] = "channel-wise"
        if axis != 1 - self.index.rank(node.input[0], node):
            raise Blocked(f"{describe_node(node)} pools over NCHW, the channels are on axis {axis}")
        if any(self.index.is_read(name) for name in node.output[1:] if name):
            raise Blocked(f"{describe_node(node)}: its indices output (flat positions) is read")
        self._carry(node.output[0], axis, block, node)

    def _reshape(self, position: int, axis: int, block: int) -> None:
        """A reshape keeps the permutation if each channel stays one contiguous run of the flat trailing dims."""
        node = self.index.nodes[position]
        self.roles[position] = "channel-wise"
        source = self.index.shapes.get(node.input[0])
        target = self.index.shapes.get(node.output[0])
        if source is None or target is None:
            raise Blocked(f"{describe_node(node)}: the shape of its input or output is unknown")
        trailing = source[len(source) + axis + 1:]
        if None in trailing:
            raise Blocked(f"{describe_node(node)}: the dims after the channel axis are not static")
        span = block * int(np.prod(trailing, dtype=np.int64))  # flat length of one channel
        inner = 1  # product of target dims after j
        for j in reversed(range(len(target))):
            if target[j] is None or inner * target[j] > self.channels * span:
                break
            if inner * target[j] == self.channels * span and span % inner == 0:
                self._carry(node.output[0], j - len(target), span // inner, node)
                return
            inner *= target[j]
        raise Blocked(f"{describe_node(node)} splits the channel axis or mixes it with other axes")


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _group(node: onnx.NodeProto) -> int:
    return int(_attributes(node).get("group", 1))


def _is_elementwise(node: onnx.NodeProto) -> bool:
    if node.domain == "com.microsoft":
        return node.op_type in MICROSOFT_ELEMENTWISE
    return node.domain in ONNX_DOMAINS and node.op_type in ELEMENTWISE
