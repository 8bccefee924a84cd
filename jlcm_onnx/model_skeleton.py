"""A model's structure without its large weights, for the checks that read no weight values.

``onnx.checker``'s full check parses the model once more in C++ and runs strict shape inference; on a 1 GB model that
is another gigabyte beside the loaded one. Shape inference needs the weights' types and shapes, and the *values* of
small constants only (shapes, axes, pads), so the skeleton keeps every initializer of at most
:data:`SKELETON_MAX_BYTES` and declares each larger one of the main graph as a graph input of the same type and shape
instead: the same nodes, the same inferred shapes, a few kilobytes.
"""

from __future__ import annotations

import onnx
from google.protobuf.message import Message
from onnx import helper

#: Initializers above this size are replaced by graph inputs in the skeleton.
SKELETON_MAX_BYTES = 1 << 16


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers above :data:`SKELETON_MAX_BYTES` are graph inputs."""
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, skip="initializer")
    declared = {value.name for value in graph.input}
    for tensor in model.graph.initializer:
        if tensor.ByteSize() <= SKELETON_MAX_BYTES:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    copy.graph.CopyFrom(graph)
    return copy


def _copy_fields(source, target, skip: str) -> None:  # noqa: ANN001 - protobuf messages of one type
    """Copies every set field of ``source`` but ``skip`` into ``target``."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        if isinstance(value, Message):
            getattr(target, descriptor.name).CopyFrom(value)
        elif hasattr(value, "extend"):  # a repeated field
            getattr(target, descriptor.name).extend(value)
        else:
            setattr(target, descriptor.name, value)
