"""Sequential calibration (passes/calibrate_sequentially.py): levels of a network, one onnxruntime pass per level,
each level fit to the inputs the compressed model gives it.

Quality is measured, not asserted: on ``deep_mlp`` at 2 bits the held-out output error is 0.198 sequential against
0.183 one-pass (error-feedback init), and on all-MiniLM-L6-v2 at 3 bits the fidelity is lower too
(``bench/calibration.py``); so sequential mode is off by default."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.analysis.activation_inputs import activation_inputs
from jlcm_onnx.analysis.calibration import load_calibration
from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.passes.calibrate_sequentially import CalibrateSequentially, weight_levels

from conftest import FLOAT, make_model, tensor, value

WIDTH, DEPTH = 48, 5


def deep_mlp(seed: int = 0):
    """``DEPTH`` square MatMul layers with tanh between them (weights scaled so activations stay O(1))."""
    rng = np.random.default_rng(seed)
    nodes, weights, current = [], [], "X"
    for layer in range(DEPTH):
        weights.append(tensor(f"W{layer}", (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH) * 1.5).astype(
            np.float32)))
        nodes.append(helper.make_node("MatMul", [current, f"W{layer}"], [f"H{layer}"], name=f"fc{layer}"))
        output = "Y" if layer == DEPTH - 1 else f"A{layer}"
        nodes.append(helper.make_node("Identity" if layer == DEPTH - 1 else "Tanh", [f"H{layer}"], [output]))
        current = output
    return make_model(nodes, [value("X", FLOAT, ["N", WIDTH])], [value("Y", FLOAT, ["N", WIDTH])], weights)


def inputs(samples: int, seed: int) -> np.ndarray:
    """Correlated inputs: 6 strong directions (fixed) plus a little noise."""
    directions = np.random.default_rng(100).standard_normal((6, WIDTH))
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((samples, 6)) @ directions + 0.1 * rng.standard_normal((samples, WIDTH))).astype(
        np.float32)


def attention_like():
    """Q, K and V read one activation, their outputs meet in a product, O reads that: levels 0, 0, 0, 1."""
    rng = np.random.default_rng(0)
    names = ("Wq", "Wk", "Wv", "Wo")
    nodes = [helper.make_node("MatMul", ["X", name], [name + "_out"]) for name in names[:3]]
    nodes += [helper.make_node("Mul", ["Wq_out", "Wk_out"], ["qk"]), helper.make_node("Add", ["qk", "Wv_out"], ["c"]),
              helper.make_node("MatMul", ["c", "Wo"], ["Y"])]
    return make_model(nodes, [value("X", FLOAT, ["N", 16])], [value("Y", FLOAT, ["N", 16])],
                      [tensor(name, rng.standard_normal((16, 16)).astype(np.float32)) for name in names])


def test_levels_follow_the_dependencies():
    model = deep_mlp()
    assert weight_levels(model.graph, activation_inputs(model, [f"W{i}" for i in range(DEPTH)])) == {
        f"W{i}": i for i in range(DEPTH)}
    model = attention_like()
    names = ["Wq", "Wk", "Wv", "Wo"]
    assert weight_levels(model.graph, activation_inputs(model, names)) == {"Wq": 0, "Wk": 0, "Wv": 0, "Wo": 1}


def compress(model, sequential: bool) -> jlcm_onnx.CompressionResult:
    config = CompressionConfig(bits=2, outlier_fraction=0.0, min_elements=1, sequential=sequential)
    return jlcm_onnx.compress(model, config, calibration=[{"X": row[None]} for row in inputs(256, seed=1)])


@pytest.fixture(scope="module")
def runs():
    model = deep_mlp()
    return model, compress(model, sequential=False), compress(model, sequential=True)


def test_one_pass_per_level_and_every_layer_learned(runs):
    _, one_pass, sequential = runs
    assert any("onnxruntime passes: 1 (on the float model)" in note for note in one_pass.report.notes)
    assert any(f"onnxruntime passes: {DEPTH} (sequential)" in note for note in sequential.report.notes)
    assert all("learned" in record.encoding for record in sequential.report.compressed)
    assert len(sequential.report.compressed) == DEPTH


def test_each_level_is_calibrated_on_the_inputs_of_the_compressed_levels_before():
    """W1's Gram is that of tanh(X @ W0^) with W0^ the encoding chosen for W0 (not of the float tanh(X @ W0))."""
    model = deep_mlp()
    config = CompressionConfig(bits=2, outlier_fraction=0.0, min_elements=1, sequential=True)
    samples = inputs(64, seed=1)
    plan = CompressionPlan(config)
    CalibrateSequentially(config, plan, load_calibration([{"X": row[None]} for row in samples], model))(model)
    decoded = plan.encodings["W0"].decode().T  # the encoder's matrix is [out, in]: back to MatMul's [in, out]
    compressed_inputs = np.tanh(samples.astype(np.float64) @ decoded)
    expected = compressed_inputs.T @ compressed_inputs
    np.testing.assert_allclose(plan.statistics["W1"].gram, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    float_inputs = np.tanh(samples.astype(np.float64) @ numpy_helper.to_array(model.graph.initializer[0]))
    assert not np.allclose(plan.statistics["W1"].gram, float_inputs.T @ float_inputs, rtol=1e-2)
    assert plan.calibration_passes == DEPTH and set(plan.encodings) == {f"W{i}" for i in range(DEPTH)}


def test_sequential_is_deterministic(runs):
    model, _, sequential = runs
    assert compress(model, sequential=True).model.SerializeToString() == sequential.model.SerializeToString()
