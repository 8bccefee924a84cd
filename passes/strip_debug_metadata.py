"""Drops the debug metadata exporters write on every node, which a deployed model runs the same without.

torch's dynamo exporter (``torch.onnx.export(dynamo=True)``) annotates each node with ``pkg.torch.onnx.stack_trace``
(the Python stack that created it, with the user's local paths), ``pkg.torch.onnx.fx_node`` (an FX node dump),
``pkg.torch.onnx.class_hierarchy``, ``pkg.torch.onnx.name_scopes`` and ``namespace``; values and the graph get
``pkg.torch.export.*`` entries. On MiniLM these are 0.6 MB, more than a twentieth of its 3-bit file, and a compressed
graph that kept them would be that much larger. Every ``metadata_props`` entry under those keys is dropped from the
graph and its subgraphs, their nodes, values and initializers, and the model's functions and their nodes; the
model's own ``metadata_props`` (a producer's or a user's notes, jlcm-onnx's settings) stay. The report's layer names
(:meth:`jlcm_onnx.ir.weight_sites.Consumer.layer`) are read before this pass, which runs last.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from google.protobuf.message import Message

from jlcm_onnx.ir.weight_sites import iter_graphs
from jlcm_onnx.passes.base import Pass, PassResult
from jlcm_onnx.report import format_bytes

#: Keys of the metadata entries dropped: these exact keys, and any key under these prefixes.
DEBUG_KEYS = frozenset({"namespace"})
DEBUG_KEY_PREFIXES = ("pkg.torch.",)


def is_debug_key(key: str) -> bool:
    return key in DEBUG_KEYS or key.startswith(DEBUG_KEY_PREFIXES)


class StripDebugMetadata(Pass):
    """Drops every exporter debug entry; ``records`` hold one note saying how many and how large, if any."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        entries, size = 0, 0
        for holder in _metadata_holders(model):
            props = holder.metadata_props
            dropped = [i for i, prop in enumerate(props) if is_debug_key(prop.key)]
            for index in reversed(dropped):
                size += props[index].ByteSize()
                del props[index]
            entries += len(dropped)
        if not entries:
            return PassResult(model, modified=False)
        note = (f"dropped the exporter's debug metadata ({entries} entries, {format_bytes(size)}: stack traces, FX "
                "nodes, module scopes); --keep-debug-metadata keeps it")
        return PassResult(model, modified=True, notes=[note])


def _metadata_holders(model: onnx.ModelProto) -> Iterator[Message]:
    for graph in iter_graphs(model.graph):
        yield graph
        yield from (*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer)
    for function in model.functions:
        yield function
        yield from (*function.node, *function.value_info)
