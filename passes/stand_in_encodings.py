"""Fills the plan with all-zero stand-in encodings, so a pipeline run measures the compressed file without fitting.

The encoder's bytes depend only on the layout of each encoding (bits, group sizes, outlier count, input blocks,
codebook dtype), never on its values, so encoding every weight with
:func:`~jlcm_onnx.analysis.site_encoding.stand_in_encoding` gives a model of exactly the compressed file's size in a
fraction of the time: no k-means, no calibration, no learning. The size planner rehearses its choices this way before
the real run (:func:`jlcm_onnx.pipeline.compress.build_pipeline` with ``rehearsal=True``). Runs after the re-ordering
pass, whose group sizes the stand-ins take; the model is not changed.
"""

from __future__ import annotations

import onnx

from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.analysis.site_encoding import stand_in_encoding
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.ir.weight_sites import compressible_sites
from jlcm_onnx.passes.base import Pass, PassResult


class StandInEncodings(Pass):
    """Puts a stand-in encoding of every compressible weight into ``plan.encodings``; leaves the model unchanged."""

    needs = frozenset({"choices", "groupings"})
    makes = frozenset({"encodings"})

    def __init__(self, config: CompressionConfig, plan: CompressionPlan) -> None:
        self.config = config
        self.plan = plan

    def call(self, model: onnx.ModelProto) -> PassResult:
        for site, row_axis in compressible_sites(model, self.config):
            self.plan.encodings[site.name] = stand_in_encoding(site, row_axis, self.config, self.plan)
        return PassResult(model, modified=False)
