"""onnxruntime sessions for compressed models, in the two run-time trade-offs the format allows.

A compressed model loaded as it is (``keep_compressed=True``, the default and what any onnxruntime user gets) keeps its
weights packed in memory and decodes each one just before its layer: resident memory stays close to the file size, at
the cost of decoding on every run. With ``keep_compressed=False`` the decode gates are replaced by a constant zero, so
onnxruntime's constant folding decodes every weight once at load time: dense-model latency and dense-model memory,
from the same small file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from jlcm_onnx.ir.graph_building import GATE_PREFIX
from jlcm_onnx.ir.lazy_weights import materialize
from jlcm_onnx.ir.model_load import load_model
from jlcm_onnx.ir.weight_sites import iter_graphs


def inference_session(
    model: str | os.PathLike | onnx.ModelProto,
    keep_compressed: bool = True,
    sess_options: ort.SessionOptions | None = None,
    providers: Sequence[str] | None = None,
) -> ort.InferenceSession:
    """An ``onnxruntime.InferenceSession`` for a (compressed) model; ``keep_compressed``: see the module docstring."""
    providers = list(providers or ["CPUExecutionProvider"])
    if keep_compressed and not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), sess_options, providers=providers)
    working, _ = load_model(model)
    if not keep_compressed:
        fold_at_load(working)
    materialize(working)
    return ort.InferenceSession(working.SerializeToString(), sess_options, providers=providers)


def fold_at_load(model: onnx.ModelProto) -> int:
    """Replaces every decode gate of ``model`` (in its graphs and its decoder functions) by a constant zero, in place;
    returns how many gates were replaced."""
    replaced = 0
    for nodes in [*(graph.node for graph in iter_graphs(model.graph)), *(f.node for f in model.functions)]:
        gates = [n.output[0] for n in nodes if n.output and n.output[0].startswith(f"{GATE_PREFIX}/gate")]
        if not gates:
            continue
        kept = [n for n in nodes if not (n.output and n.output[0].startswith(f"{GATE_PREFIX}/"))]
        zeros = [helper.make_node("Constant", [], [gate], value=numpy_helper.from_array(np.array(0, np.uint8)))
                 for gate in gates]
        del nodes[:]
        nodes.extend([*zeros, *kept])
        replaced += len(gates)
    return replaced
