"""Each weight's decoder as one call of a model-local ONNX function, so a compressed weight is one node in a viewer.

A decoder (:mod:`jlcm_onnx.encodings.codebook_decoder`) reads its weight's stored tensors (packed codes, codebooks, row
order, outliers), a few small constants shared by all decoders of its graph (shapes, shift amounts) and one run-time
tensor (the layer's input, which its decode gate is computed from, or the looked-up ids), and writes one tensor. Here
it becomes one node::

    W = jlcm.DecodeWeight(packed, codebooks, ..., x)

whose function body is the decoder with the shared constants inlined as ``Constant`` nodes and every name made
canonical (inputs ``x0..``, intermediates ``t0..``, output ``y``). Decoders that differ only in their stored data have
the same body and share one function: there is one function per decoder kind and shape class, not one per weight.
The kinds are :data:`DECODE_WEIGHT` (a weight decoded whole before its consumer), :data:`DECODE_ROWS` (an embedding's
looked-up rows) and :data:`BLOCKED_MATMUL` (a large MatMul decoded and multiplied one column block at a time).

onnxruntime inlines model-local functions when it loads a model, so the graph it optimises and runs is the one the
decoders would have made inline: the gate still keeps the decode from being folded at load, and speed and memory are
unchanged. Model-local functions need IR version 8; an older model's IR version is raised to 8 (the opsets stay).
"""

from __future__ import annotations

import onnx
from onnx import helper

from jlcm_onnx.ir.graph_building import GATE_PREFIX

#: The functions' domain.
DOMAIN = "jlcm"
DOMAIN_VERSION = 1
#: The IR version that introduced model-local functions.
FUNCTIONS_IR_VERSION = 8

DECODE_WEIGHT = "DecodeWeight"
DECODE_ROWS = "DecodeRows"
BLOCKED_MATMUL = "BlockedMatMul"


def _intermediate(tensor: str, index: int) -> str:
    """The canonical name of an intermediate tensor: ``t<index>``, or for the decode gate's tensors their role after
    :data:`~jlcm_onnx.ir.graph_building.GATE_PREFIX` (``jlcm/gate/gate<index>``), which
    :func:`jlcm_onnx.ir.runtime.fold_at_load` looks for."""
    if not tensor.startswith(f"{GATE_PREFIX}/"):
        return f"t{index}"
    role = tensor.removeprefix(f"{GATE_PREFIX}/").split("_")[0]
    return f"{GATE_PREFIX}/{role}{index}"


class DecoderFunctions:
    """Turns decoders into calls of shared functions (:meth:`call`); :meth:`install` adds the functions to a model.

    ``constants``: the shared constants decoders may read (name -> tensor), inlined into the bodies."""

    def __init__(self, constants: dict[str, onnx.TensorProto], opset: int, taken: set[str] | None = None) -> None:
        self.constants = constants
        self.opset = opset
        self.functions: list[onnx.FunctionProto] = []
        self._taken = set(taken or ())  # names of the model's own functions in DOMAIN (a file compressed before)
        self._by_body: dict[tuple[str, bytes], str] = {}

    def call(self, nodes: list[onnx.NodeProto], kind: str, name: str) -> onnx.NodeProto:
        """One node of domain :data:`DOMAIN` computing what ``nodes`` compute: their last node's output, from the
        tensors they read that they neither produce nor find among the shared constants."""
        produced = {output for node in nodes for output in node.output}
        inputs: list[str] = []
        constants: list[str] = []
        for node in nodes:
            for tensor in node.input:
                if not tensor or tensor in produced or tensor in inputs or tensor in constants:
                    continue
                (constants if tensor in self.constants else inputs).append(tensor)
        output = nodes[-1].output[0]
        canonical = {tensor: f"x{index}" for index, tensor in enumerate(inputs)}
        canonical.update({tensor: f"c{index}" for index, tensor in enumerate(constants)})
        body = [helper.make_node("Constant", [], [canonical[tensor]], value=self.constants[tensor], name=f"c{index}")
                for index, tensor in enumerate(constants)]
        for index, node in enumerate(nodes):
            for tensor in node.output:
                canonical.setdefault(tensor, "y" if tensor == output else _intermediate(tensor, len(canonical)))
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"n{index}"
            copy.input[:] = [canonical[tensor] if tensor else "" for tensor in node.input]
            copy.output[:] = [canonical[tensor] for tensor in node.output]
            body.append(copy)
        for node in body[: len(constants)]:
            node.attribute[0].t.name = ""
        key = (kind, b"".join(node.SerializeToString() for node in body))  # the body names every input it reads
        if key not in self._by_body:
            function_name, variant = kind, 1
            while function_name in self._taken:
                variant += 1
                function_name = f"{kind}_{variant}"
            self._taken.add(function_name)
            self.functions.append(helper.make_function(
                DOMAIN, function_name, [f"x{index}" for index in range(len(inputs))], ["y"], body,
                [helper.make_opsetid("", self.opset)]))
            self._by_body[key] = function_name
        return helper.make_node(self._by_body[key], inputs, [output], name=name, domain=DOMAIN)

    def install(self, model: onnx.ModelProto) -> None:
        """Adds the functions and their domain to ``model`` (IR version raised to 8 where older)."""
        if not self.functions:
            return
        model.functions.extend(self.functions)
        if all(entry.domain != DOMAIN for entry in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        model.ir_version = max(model.ir_version, FUNCTIONS_IR_VERSION)
