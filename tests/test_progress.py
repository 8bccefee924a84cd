"""Progress in a log: one line per phase and per tenth of its work, never the same line twice in a row."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.devices import map_on_cores
from jlcm_onnx.progress import Phase

from conftest import make_model, tensor, value


def test_a_phase_logs_each_tenth_once() -> None:
    log = io.StringIO()
    with Phase("encoding", total=1000, stream=log) as phase:
        for _ in range(1000):
            phase.advance(1)
    lines = log.getvalue().splitlines()
    assert lines[0] == "encoding..."
    assert [re.match(r"encoding: (\d+)%", line).group(1) for line in lines[1:]] == [str(p) for p in range(10, 101, 10)]


def test_a_phase_without_a_total_logs_start_and_end() -> None:
    log = io.StringIO()
    with Phase("checking the output", stream=log):
        pass
    lines = log.getvalue().splitlines()
    assert lines[0] == "checking the output..." and re.fullmatch(r"checking the output: done in \d+\.\d s", lines[1])


def test_progress_is_weighted_by_work() -> None:
    """A first item holding 90% of the work moves the log to 90% when it is done, not to 1/10."""
    log = io.StringIO()
    with Phase("work", total=100, stream=log) as phase:
        phase.advance(90)
    assert log.getvalue().splitlines()[-1].startswith("work: 90%")


def test_disabled_phase_prints_nothing() -> None:
    log = io.StringIO()
    with Phase("work", total=10, stream=log, enabled=False) as phase:
        phase.advance(10)
    assert log.getvalue() == ""


def test_map_on_cores_keeps_order_whatever_finishes_first() -> None:
    assert map_on_cores(lambda v: v * v, list(range(20)), description="t", weight=lambda v: v + 1) == [
        v * v for v in range(20)]


@pytest.mark.parametrize("calibrated", [False, True])
def test_compress_log_without_a_terminal(calibrated: bool, capsys: pytest.CaptureFixture[str],
                                         rng: np.random.Generator) -> None:
    model = _chain([rng.standard_normal((192, 192)).astype(np.float32) for _ in range(12)])
    data = [{"X": rng.standard_normal((4, 192)).astype(np.float32)} for _ in range(8)] if calibrated else None
    config = CompressionConfig(bits=3, min_elements=64, target_ratio=None if calibrated else 4.0)
    jlcm_onnx.compress(model, config, data, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines and not any("\r" in line for line in lines)
    assert all(a != b for a, b in zip(lines, lines[1:], strict=False))
    phases = Counter(line.split(":")[0].removesuffix("...") for line in lines)
    assert max(phases.values()) <= 11 * 8  # a phase may run once per planner step; at most 11 lines each time
    assert "checking the output (onnx.checker, onnxruntime load, spot check)" in phases


def _chain(weights: list[np.ndarray]) -> onnx.ModelProto:
    """X [N, 192] -> a chain of MatMuls by 192x192 weights."""
    nodes = [helper.make_node("MatMul", ["X" if i == 0 else f"Y{i - 1}", f"W{i}"], [f"Y{i}"])
             for i in range(len(weights))]
    output = value(f"Y{len(weights) - 1}", TensorProto.FLOAT, ["N", 192])
    return make_model(nodes, [value("X", TensorProto.FLOAT, ["N", 192])], [output],
                      [tensor(f"W{i}", weight) for i, weight in enumerate(weights)])
