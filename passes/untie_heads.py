"""Gives a table tied to a language-model head a copy of its own for the head, so each reader runs in a fast format.

A table ``E`` [V, D] read by an embedding ``Gather`` and, through ``Transpose(perm=[1, 0])``, as the B of the head's
MatMul (``logits = h @ E^T``) has two readers that want different formats: the Gather reads a few rows per run (a
codebook row decoder decodes only those), the head reads all of it every run (only onnxruntime's fused kernel reads it
without decoding it). Stored once, the table would be decoded whole on every run. With ``speed="fast"`` this pass
adds ``E^T`` as an initializer of its own that the MatMul reads directly (the Transpose goes), so ``E`` becomes a lone
Gather table and ``E^T`` a lone MatMul weight, each encoded in its own format: the table is stored twice, compressed
both times. The model computes exactly the same function.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.ir.weight_sites import compressible_sites, tied_head
from jlcm_onnx.passes.base import Pass, PassResult

#: Suffix of the head's copy of a tied table.
HEAD_SUFFIX = ".jlcm_head"


class UntieHeads(Pass):
    """Unties every compressible table read by one Gather and one transposed head MatMul; its notes name them."""

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config

    def call(self, model: onnx.ModelProto) -> PassResult:
        tied = [(site, head) for site, _ in compressible_sites(model, self.config)
                for head in [tied_head(site)] if head is not None]
        for site, (transpose, matmul) in tied:
            copy = numpy_helper.from_array(np.ascontiguousarray(site.array().T), f"{site.name}{HEAD_SUFFIX}")
            site.graph.initializer.append(copy)
            matmul.node.input[1] = copy.name
            site.graph.node.remove(transpose.node)
        notes = [f"{site.name}: tied to the head {matmul.describe()}, stored twice (a copy for each reader)"
                 for site, (_, matmul) in tied]
        return PassResult(model, modified=bool(tied), notes=notes)
