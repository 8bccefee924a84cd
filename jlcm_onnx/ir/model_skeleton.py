"""A model's structure without its large weights, for the checks that read no weight values.

``onnx.checker``'s full check parses the model once more in C++ and runs strict shape inference; on a 1 GB model that
is another gigabyte beside the loaded one. Shape inference needs the weights' types and shapes, and the *values* of
small constants only (shapes, axes, pads), so the skeleton keeps every initializer of at most
:data:`SKELETON_MAX_BYTES` and declares each larger one of the main graph (and each one still in its file,
:mod:`jlcm_onnx.ir.lazy_weights`) as a graph input of the same type and shape instead: the same nodes, the same inferred
shapes, a few kilobytes.

For onnxruntime sessions that must see the weights as constants (so its constant folding and fusions, and thus its
numbers, are those of the full model) :func:`session_with_weights` keeps the large initializers declared with
external data and hands their values to onnxruntime as arrays, in memory or memory-mapped from their files
(``add_external_initializers``), instead of a serialized copy.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import Message
from onnx import helper

from jlcm_onnx.ir.lazy_weights import is_lazy, lazy_location, materialize, tensor_array
from jlcm_onnx.ir.tensor_size import stored_bytes
from jlcm_onnx.ir.weight_sites import names_read_in_bodies

#: Initializers above this size are replaced by graph inputs in the skeleton.
SKELETON_MAX_BYTES = 1 << 16
#: The external-data location of weights handed to onnxruntime from memory (never a file).
IN_MEMORY = "jlcm-onnx-in-memory"
#: The session option naming the folder of the external data of a model given as bytes.
FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def skeleton(model: onnx.ModelProto, as_inputs: set[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers above :data:`SKELETON_MAX_BYTES` (or, given ``as_inputs``,
    those named there) are graph inputs; the others are copied (lazy ones read), the moved ones never are."""
    moved = _moved(model, as_inputs)
    graph = _graph_without(model, moved)
    declared = {value.name for value in graph.input}
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
                       if t.name in moved and t.name not in declared)
    structure = model_with_graph(model, graph)
    materialize(structure)
    return structure


def session_with_weights(
    model: onnx.ModelProto, options: ort.SessionOptions, providers: list[str],
    outputs: list[onnx.ValueInfoProto] | None = None,
) -> tuple[ort.InferenceSession, list[np.ndarray]]:
    """An onnxruntime session of ``model`` (with ``outputs`` as its graph outputs, when given: the nodes and weights
    they do not depend on are left out, as onnxruntime would run them anyway) whose large initializers reach
    onnxruntime outside the serialized model; returns the session and the arrays handed over, which must live as long
    as the session.

    Weights still in their file (:mod:`jlcm_onnx.ir.lazy_weights`) are declared as external data of that file, which
    onnxruntime reads itself (``session.model_external_initializers_file_folder_path``, onnxruntime 1.17+; it
    memory-maps what it can): it holds them once. The others are handed over as arrays
    (``add_external_initializers``), which onnxruntime copies."""
    folder = _common_folder(model)
    moved = _moved(model, None)
    graph = _graph_without(model, moved)
    if outputs is not None:
        del graph.output[:]
        graph.output.extend(outputs)
        _remove_dead_nodes(graph)
    read = {name for node in graph.node for name in (*node.input, *names_read_in_bodies(node))}
    read.update(value.name for value in graph.output)
    names, arrays = [], []
    for tensor in model.graph.initializer:
        if tensor.name not in moved or tensor.name not in read:
            continue
        declared = graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                         data_location=onnx.TensorProto.EXTERNAL)
        if folder is not None and is_lazy(tensor):
            for entry in tensor.external_data:
                value = os.path.basename(entry.value) if entry.key == "location" else entry.value
                declared.external_data.add(key=entry.key, value=value)
            continue
        arrays.append(tensor_array(tensor))
        names.append(tensor.name)
        declared.external_data.add(key="location", value=IN_MEMORY)
    if folder is not None:
        options.add_session_config_entry(FOLDER_KEY, folder)
    options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    serialized = model_with_graph(model, graph).SerializeToString()
    return ort.InferenceSession(serialized, options, providers=providers), arrays


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Removes, in place, the nodes (in topological order) that no graph output depends on, and the initializers
    only they read. onnxruntime runs every node whatever the outputs asked for: a language model's unused head would
    still make its logits, 8 GB for a batch of 32 x 256 tokens over a vocabulary of 262,144."""
    needed = {value.name for value in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in (*node.input, *names_read_in_bodies(node)) if name)
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(reversed(kept))
    graph.initializer.extend(initializers)


def _common_folder(model: onnx.ModelProto) -> str | None:
    """The one folder of the files that ``model``'s lazy weights are in, or None (none, or several)."""
    folders = {os.path.dirname(lazy_location(t)) for t in model.graph.initializer if is_lazy(t)}
    return folders.pop() if len(folders) == 1 else None


def _moved(model: onnx.ModelProto, names: set[str] | None) -> set[str]:
    if names is not None:
        return names
    return {t.name for t in model.graph.initializer if is_lazy(t) or stored_bytes(t) > SKELETON_MAX_BYTES}


def _graph_without(model: onnx.ModelProto, moved: set[str]) -> onnx.GraphProto:
    """The main graph with every field but the initializers ``moved``."""
    graph = onnx.GraphProto()
    copy_fields(model.graph, graph, skip="initializer")
    graph.initializer.extend(t for t in model.graph.initializer if t.name not in moved)
    return graph


def model_with_graph(model: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    """A copy of ``model`` (opsets, functions, metadata) with ``graph`` as its main graph."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip="graph")
    copy.graph.CopyFrom(graph)
    return copy


def copy_fields(source, target, skip: str) -> None:  # noqa: ANN001 - protobuf messages of one type
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
