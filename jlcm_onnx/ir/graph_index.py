"""An index of a model's main graph for searches that walk it (:mod:`jlcm_onnx.ir.channel_search`): each node's
position, each tensor's producer and readers, the stored constants and the inferred shapes. A lookup that fails
raises :class:`Blocked` with a one-line reason naming the node.
"""

from __future__ import annotations

import onnx

from jlcm_onnx.ir.weight_sites import FLOAT_TYPES, names_read_in_bodies

ONNX_DOMAINS = ("", "ai.onnx")
Shape = tuple[int | None, ...]


class Blocked(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GraphIndex:
    """Nodes (by position), producers, consumers, constants and inferred shapes of a model's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.constants = stored_tensors(graph)
        self.outputs = {value.name for value in graph.output}
        self.producers: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        self.nested_readers: dict[str, list[int]] = {}
        for position, node in enumerate(self.nodes):
            for name in node.output:
                self.producers[name] = position
            for index, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((position, index))
            for name in names_read_in_bodies(node):
                self.nested_readers.setdefault(name, []).append(position)
        self.shapes = _inferred_shapes(model)
        self.shapes.update({name: tuple(proto.dims) for name, proto in self.constants.items()})

    def readers(self, name: str) -> list[int]:
        """Positions of the nodes that read ``name``, directly or inside their subgraphs."""
        return [position for position, _ in self.consumers.get(name, [])] + self.nested_readers.get(name, [])

    def is_read(self, name: str) -> bool:
        return bool(self.readers(name)) or name in self.outputs

    def constant_shape(self, name: str, node: onnx.NodeProto) -> tuple[int, ...]:
        if name not in self.constants:
            raise Blocked(f"{describe_node(node)} reads {name}, which is not a constant")
        return tuple(self.constants[name].dims)

    def rank(self, name: str, node: onnx.NodeProto) -> int:
        if name not in self.shapes:
            raise Blocked(f"{describe_node(node)}: the rank of {name} is unknown")
        return len(self.shapes[name])


def stored_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values of ``graph`` (not of its subgraphs), by name."""
    tensors = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attribute.t
    return tensors


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes from ONNX shape inference, run on a copy whose float initializers are declared inputs (only their shapes
    matter), so that the weights are not serialized."""
    graph = model.graph
    weights = [t for t in graph.initializer if t.data_type in FLOAT_TYPES]
    light = onnx.helper.make_model(
        onnx.helper.make_graph(
            graph.node,
            graph.name,
            [*graph.input, *(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in weights)],
            graph.output,
            [t for t in graph.initializer if t.data_type not in FLOAT_TYPES],
            value_info=graph.value_info,
        ),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
        functions=model.functions,
    )
    inferred = onnx.shape_inference.infer_shapes(light).graph
    shapes: dict[str, Shape] = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return shapes


def describe_node(node: onnx.NodeProto) -> str:
    return f"{node.op_type}:{node.name or node.output[0]}"
