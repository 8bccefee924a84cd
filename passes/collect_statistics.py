"""Collects each compressible weight's calibration statistics (Gram of its layer inputs) into the plan.

Runs after the re-ordering pass, on the re-ordered model, so a weight whose input channels were permuted to follow the
previous layer's groups gets a Gram in the same permuted column order as the matrix the encoder sees. The model is
not changed; :class:`~jlcm_onnx.passes.encode_weights.EncodeWeights` reads ``plan.statistics``.
"""

from __future__ import annotations

import onnx

from jlcm_onnx.analysis.calibration import CalibrationData
from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.analysis.statistics import batch_size, collect_statistics
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.devices import execution_providers
from jlcm_onnx.ir.weight_sites import compressible_sites
from jlcm_onnx.passes.base import Pass, PassResult


class CalibrationPass(Pass):
    """A pass that reads calibration data into the shared plan."""

    def __init__(
        self, config: CompressionConfig, plan: CompressionPlan, data: CalibrationData, progress: bool = False
    ) -> None:
        self.config = config
        self.plan = plan
        self.data = data
        self.progress = progress


class CollectStatistics(CalibrationPass):
    """Fills ``plan.statistics`` from one onnxruntime pass over the calibration data; leaves the model unchanged."""

    needs = frozenset({"groupings"})
    makes = frozenset({"statistics", "calibration_passes"})

    def call(self, model: onnx.ModelProto) -> PassResult:
        names = [site.name for site, _ in compressible_sites(model, self.config)]
        batches = self.data.batches(batch_size(model, names, next(iter(self.data))))
        self.plan.statistics.update(
            collect_statistics(model, names, batches, progress=self.progress,
                               providers=execution_providers(self.plan.device), mask=self.data.mask))
        self.plan.calibration_passes += 1
        return PassResult(model, modified=False)
