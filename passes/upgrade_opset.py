"""Raises a model's ai.onnx opset and IR version to what its decoders need (``onnx.version_converter``).

The affine-blocks decoders use ``DequantizeLinear`` with ``block_size`` and UINT4 codes (opset 21, IR 10), or UINT2
codes (opset 25, IR 11). A model exported at an older opset is converted first; the converter rewrites only the nodes
whose semantics changed between the two opsets, so the model computes the same function (the output check of
:func:`jlcm_onnx.compress` compares it with the original). A model the converter cannot upgrade keeps its opset, with
the converter's reason in the report; formats its opset cannot express then take no weight
(:meth:`jlcm_onnx.encodings.base.Encoding.model_needs`), and its weights go to the next format that does.

Only the model's structure goes through the converter (:mod:`jlcm_onnx.ir.model_skeleton`: large weights as graph
inputs, small constants kept for the adapters that read them); the weights are then moved into the converted model
as they were, so a 1 GB model is not serialized, parsed and copied by the converter. The converter drops model-local
functions (a file compressed before, say), so they are inlined first.
"""

from __future__ import annotations

import onnx
from onnx import inliner, version_converter

from jlcm_onnx.ir.model_skeleton import skeleton
from jlcm_onnx.ir.weight_sites import default_opset
from jlcm_onnx.passes.base import Pass, PassResult


class UpgradeOpset(Pass):
    """Converts the model to at least ai.onnx ``opset`` and IR ``ir_version``; its notes say what changed."""

    def __init__(self, opset: int, ir_version: int) -> None:
        self.opset = opset
        self.ir_version = ir_version

    def call(self, model: onnx.ModelProto) -> PassResult:
        current = default_opset(model)
        if current >= self.opset and model.ir_version >= self.ir_version:
            return PassResult(model, modified=False)
        notes = []
        if current < self.opset:
            try:
                structure = inliner.inline_local_functions(skeleton(model))  # the converter drops functions
                model = _with_weights_of(model, version_converter.convert_version(structure, self.opset))
            except Exception as error:  # noqa: BLE001 - the converter raises bare RuntimeErrors and its own types
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                return PassResult(model, modified=False, notes=[
                    f"ai.onnx opset {current} kept: onnx.version_converter cannot upgrade this model to {self.opset} "
                    f"({reason}); the formats that need it (speed 'fast': affine blocks) are not used, and the "
                    "weights are written as codebooks instead"])
            notes.append(f"ai.onnx opset {current} -> {self.opset} (onnx.version_converter): what DequantizeLinear "
                           "with blocks needs")
        if model.ir_version < self.ir_version:
            notes.append(f"IR version {model.ir_version} -> {self.ir_version}")
            model.ir_version = self.ir_version
        return PassResult(model, modified=True, notes=notes)


def _with_weights_of(original: onnx.ModelProto, converted: onnx.ModelProto) -> onnx.ModelProto:
    """``converted`` (a converted skeleton of ``original``) with ``original``'s large initializers back in place of
    the graph inputs that stood for them, every initializer in ``original``'s order."""
    result = onnx.ModelProto()
    result.CopyFrom(converted)
    converted_tensors = {t.name: t for t in converted.graph.initializer}
    moved = {t.name for t in original.graph.initializer} - set(converted_tensors)
    declared = {v.name for v in original.graph.input}
    inputs = [v for v in converted.graph.input if v.name not in moved or v.name in declared]
    del result.graph.input[:]
    result.graph.input.extend(inputs)
    tensors = [converted_tensors.pop(t.name, t) for t in original.graph.initializer]
    del result.graph.initializer[:]
    result.graph.initializer.extend([*tensors, *converted_tensors.values()])  # then any the converter added
    return result
