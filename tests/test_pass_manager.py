"""The pass manager (jlcm_onnx.passes.manager): a pass list is checked before anything runs, and what ran is kept."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.passes.encode_weights import EncodeWeights
from jlcm_onnx.passes.manager import PassManager, PipelineError
from jlcm_onnx.passes.reorder_neurons import ReorderNeurons
from jlcm_onnx.passes.stand_in_encodings import StandInEncodings
from jlcm_onnx.pipeline.pass_list import build_pipeline

from conftest import matmul_model

CONFIG = CompressionConfig(bits=4, min_elements=16)


def test_a_pass_that_needs_a_later_result_is_refused_before_anything_runs() -> None:
    plan = CompressionPlan(CONFIG)
    with pytest.raises(PipelineError, match="EncodeWeights needs groupings, which no pass before it makes"):
        PassManager([EncodeWeights(CONFIG, plan), ReorderNeurons(CONFIG, plan)])
    with pytest.raises(PipelineError, match="StandInEncodings needs groupings"):
        PassManager([StandInEncodings(CONFIG, plan)])


@pytest.mark.parametrize("settings", [{}, {"speed": "fast"}, {"keep_debug_metadata": True}])
def test_every_pipeline_the_compressor_builds_is_valid(settings: dict) -> None:
    config = CompressionConfig(**settings)
    for rehearsal in (False, True):
        PassManager(build_pipeline(config, CompressionPlan(config), progress=False, rehearsal=rehearsal))


def test_the_report_says_which_passes_ran(rng: np.random.Generator, caplog: pytest.LogCaptureFixture) -> None:
    model = matmul_model(rng.standard_normal((64, 32)).astype(np.float32))
    with caplog.at_level(logging.DEBUG, logger="jlcm_onnx.passes"):
        result = jlcm_onnx.compress(model, CONFIG)
    ran = [entry.name for entry in result.report.passes]
    assert ran == ["ReorderNeurons", "EncodeWeights", "StripDebugMetadata"]
    assert [entry["name"] for entry in result.report.to_dict()["passes"]] == ran
    assert next(p for p in result.report.passes if p.name == "EncodeWeights").modified
    assert any(record.getMessage().startswith("EncodeWeights: ") for record in caplog.records)
