"""What each weight format costs at run time, per weight: the cost model speed 'balanced' plans with.

Measured by ``python bench/decode_speed.py`` (one 1536 x 1536 MatMul layer in every format, one row of activations,
that is one token at batch 1, where decoding costs the most against the product; default onnxruntime session options,
2 threads) and stored in the package (``jlcm_onnx/data/run_costs.json``), so that every run plans with the same
numbers; rerunning the script on another machine class replaces them. Times are nanoseconds per weight of the layer's
product, decode included: ``dense`` (the fp32 product), ``codebook[b]`` (b-bit codes looked up, then multiplied) and
``fused[b][B]`` (affine blocks of B inputs in onnxruntime's ``MatMulNBits``). A width or block size that was not
measured takes the nearest one that was (the wider on a tie).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from importlib import resources

from jlcm_onnx.encodings.affine_format import FUSED
from jlcm_onnx.report import TensorRecord


@dataclass(frozen=True)
class RunCosts:
    """Nanoseconds per weight at one row: ``dense``, ``codebook`` by bits, ``fused`` by bits then block size;
    ``machine``: where they were measured."""

    dense: float
    codebook: dict[int, float]
    fused: dict[int, dict[int, float]]
    machine: str

    @classmethod
    def packaged(cls) -> RunCosts:
        """The cost model stored in the package."""
        values = json.loads(resources.files("jlcm_onnx").joinpath("data", "run_costs.json").read_text())
        return cls(values["dense"], {int(b): ns for b, ns in values["codebook"].items()},
                   {int(b): {int(block): ns for block, ns in blocks.items()} for b, blocks in values["fused"].items()},
                   values["machine"])

    def codebook_ns(self, bits: int) -> float:
        return self.codebook[_nearest(self.codebook, bits)]

    def fused_ns(self, bits: int, block: int) -> float:
        blocks = self.fused[_nearest(self.fused, bits)]
        return blocks[_nearest(blocks, block)]


def with_estimated_ns(record: TensorRecord, costs: RunCosts, affine_block: int) -> TensorRecord:
    """``record`` with its product's estimated time at one token: fused affine blocks of ``affine_block`` inputs, or
    codebooks decoded on every run (a weight decoded whole: its gate is a run-time input or its blocked product)."""
    if record.bits is None or record.decode_gate is None:
        return record
    weights = math.prod(record.shape)
    if record.decode_gate == FUSED:
        return replace(record, estimated_ns=round(weights * costs.fused_ns(record.bits, affine_block), 1))
    if record.decode_gate.startswith(("none", "row decoder")):
        return record
    return replace(record, estimated_ns=round(weights * costs.codebook_ns(record.bits), 1))


def _nearest(measured: dict[int, object], wanted: int) -> int:
    return min(measured, key=lambda key: (abs(key - wanted), -key))
