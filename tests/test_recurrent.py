"""LSTM, GRU and RNN weights (W and R, [directions, gates * hidden, inputs]) compressed and decoded exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig

from conftest import FLOAT, dequantized, make_model, replace_initializer, run, tensor, value

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(op: str, rng: np.random.Generator, hidden: int = 32, inputs: int = 24) -> onnx.ModelProto:
    """X [sequence, batch, inputs] -> a bidirectional ``op`` -> Y [sequence, directions, batch, hidden]."""
    gates = GATES[op]
    weights = {"W": rng.standard_normal((2, gates * hidden, inputs)).astype(np.float32) * 0.3,
               "R": rng.standard_normal((2, gates * hidden, hidden)).astype(np.float32) * 0.3,
               "B": rng.standard_normal((2, 2 * gates * hidden)).astype(np.float32) * 0.1}
    node = helper.make_node(op, ["X", "W", "R", "B"], ["Y"], hidden_size=hidden, direction="bidirectional")
    return make_model([node], [value("X", FLOAT, ["S", "N", inputs])], [value("Y", FLOAT, ["S", 2, "N", hidden])],
                      [tensor(name, array) for name, array in weights.items()])


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_weights_decode_exactly(op: str, rng: np.random.Generator) -> None:
    model = recurrent_model(op, rng)
    config = CompressionConfig(bits=3, min_elements=64)
    result = jlcm_onnx.compress(model, config)
    assert sorted(r.name for r in result.report.compressed) == ["R", "W"]  # the bias B is left alone
    assert all(r.layer.endswith(f"({op})") for r in result.report.compressed)
    expected = model
    for name in ("W", "R"):
        weight = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
        expected = replace_initializer(expected, name, dequantized(weight, 1, config))
    feed = {"X": rng.standard_normal((5, 3, 24)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feed)[0], run(expected, feed)[0], rtol=1e-5, atol=1e-6)


def test_recurrent_weights_can_be_left_alone(rng: np.random.Generator) -> None:
    config = CompressionConfig(bits=3, min_elements=64, op_types=("MatMul", "Gemm", "Conv", "Gather"))
    result = jlcm_onnx.compress(recurrent_model("LSTM", rng), config)
    assert not result.report.compressed


@pytest.mark.parametrize("settings", [{"speed": "fast", "bits": 4}, {"bits": 3, "groups": 8},
                                      {"bits": 3, "block_size": 32}, {"target_ratio": 5.0}])
def test_every_format_runs_on_recurrent_weights(settings: dict, rng: np.random.Generator) -> None:
    """Each format and the size target, data-free and with calibration (recurrent layers get no statistics and are
    fitted data-free): outputs stay close to the original's."""
    model = recurrent_model("LSTM", rng, hidden=64, inputs=64)
    feeds = [{"X": rng.standard_normal((5, 2, 64)).astype(np.float32)} for _ in range(4)]
    for data in (None, feeds):
        result = jlcm_onnx.compress(model, CompressionConfig(min_elements=64, **settings), data)
        assert sorted(r.name for r in result.report.compressed) == ["R", "W"]
        expected, actual = run(model, feeds[0])[0], run(result.model, feeds[0])[0]
        cosine = (expected * actual).sum() / np.linalg.norm(expected) / np.linalg.norm(actual)
        assert cosine > 0.93  # measured 0.939-0.998 data-free
