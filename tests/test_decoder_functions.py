"""Each decoder is one call of a model-local function (domain ``jlcm``), shared by the weights of one shape class, and
onnxruntime runs the file as it ran the inline decoders: same outputs, gates that still block folding, folding where
``decode_at_load`` asks for it, version conversion and the full check accepted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx.version_converter
import onnxruntime as ort
import pytest
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.ir.decoder_functions import DOMAIN

from conftest import FLOAT, INT64, check_full, make_model, run, tensor, value

CONFIG = CompressionConfig(bits=3, min_elements=64)


def stacked_model(rng: np.random.Generator, layers: int = 4, width: int = 32) -> onnx.ModelProto:
    """An embedding, then ``layers`` MatMul + Relu of one shape, then a wider MatMul: two shape classes of MatMul."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h0"], name="embed")]
    weights = {"table": rng.standard_normal((100, width))}
    for layer in range(layers):
        weights[f"w{layer}"] = rng.standard_normal((width, width)) / np.sqrt(width)
        nodes += [helper.make_node("MatMul", [f"h{layer}", f"w{layer}"], [f"m{layer}"], name=f"layer{layer}"),
                  helper.make_node("Relu", [f"m{layer}"], [f"h{layer + 1}"])]
    weights["head"] = rng.standard_normal((width, 2 * width)) / np.sqrt(width)
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "head"], ["y"], name="head"))
    return make_model(nodes, [value("ids", INT64, ["N"])], [value("y", FLOAT, ["N", 2 * width])],
                      [tensor(name, array.astype(np.float32)) for name, array in weights.items()])


def inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.inliner.inline_local_functions(model)


def test_one_call_per_weight_and_one_function_per_shape_class(rng: np.random.Generator) -> None:
    model = stacked_model(rng)
    result = jlcm_onnx.compress(model, CONFIG.replace(reorder=False))
    compressed = result.model
    calls = [n for n in compressed.graph.node if n.domain == DOMAIN]
    assert len(calls) == len(result.report.compressed) == 6
    assert {f.name for f in compressed.functions} == {n.op_type for n in calls}
    kinds = sorted(n.op_type for n in calls)
    assert kinds.count("DecodeRows") == 1  # the embedding's looked-up rows
    assert len(compressed.functions) == 3  # the rows, the four square weights, the head
    assert {entry.domain for entry in compressed.opset_import} >= {DOMAIN}
    assert len(compressed.graph.node) == len(model.graph.node) + len(calls) - 1  # the Gather is its call
    check_full(compressed)
    feed = {"ids": np.array([3, 14, 15, 92], dtype=np.int64)}
    np.testing.assert_array_equal(run(compressed, feed)[0], run(inlined(compressed), feed)[0])


@pytest.mark.parametrize("settings", [{"bits": 3}, {"bits": 3, "groups": 4}, {"bits": 3, "block_size": 16},
                                      {"encoding": "multi-scaling", "groups": 4}, {"speed": "fast", "bits": 4},
                                      {"bits": 4, "outlier_fraction": 0.02}])
def test_calls_compute_what_inline_decoders_compute(settings: dict, rng: np.random.Generator) -> None:
    result = jlcm_onnx.compress(stacked_model(rng, width=64), CompressionConfig(min_elements=64, **settings))
    feed = {"ids": np.arange(10, dtype=np.int64)}
    np.testing.assert_array_equal(run(result.model, feed)[0], run(inlined(result.model), feed)[0])


def optimized(model: onnx.ModelProto, path: Path) -> tuple[set[str], int]:
    """The op types of the graph onnxruntime runs, and how many dense [32, 32] float weights it holds."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(path).graph
    dense = sum(list(t.dims) == [32, 32] and t.data_type == onnx.TensorProto.FLOAT for t in graph.initializer)
    return {node.op_type for node in graph.node}, dense


def test_onnxruntime_inlines_the_calls_and_the_gate_still_blocks_folding(rng: np.random.Generator,
                                                                        tmp_path: Path) -> None:
    model = stacked_model(rng)
    ops, dense = optimized(jlcm_onnx.compress(model, CONFIG).model, tmp_path / "gated.onnx")
    assert {"BitShift", "GatherElements"} <= ops and not {"DecodeWeight", "DecodeRows"} & ops
    assert dense == 0  # every weight stays packed and is decoded on each run
    ops, dense = optimized(jlcm_onnx.compress(model, CONFIG.replace(decode_at_load=True)).model,
                           tmp_path / "folded.onnx")
    assert dense == 4 and "DecodeWeight" not in ops  # the four square weights decoded once, at load


def test_version_conversion_of_the_inlined_file_keeps_the_outputs(rng: np.random.Generator) -> None:
    """onnx's version converter drops model-local functions (onnx 1.23); the README's recipe inlines them first."""
    compressed = jlcm_onnx.compress(stacked_model(rng), CONFIG).model
    opset = next(entry.version for entry in compressed.opset_import if entry.domain == "")
    converted = onnx.version_converter.convert_version(inlined(compressed), opset + 1)
    check_full(converted)
    feed = {"ids": np.array([1, 2, 3], dtype=np.int64)}
    np.testing.assert_allclose(run(converted, feed)[0], run(compressed, feed)[0], rtol=1e-6, atol=1e-6)


def test_an_old_ir_version_is_raised_to_hold_functions(rng: np.random.Generator) -> None:
    model = stacked_model(rng)
    model.ir_version = 7
    compressed = jlcm_onnx.compress(model, CONFIG).model
    assert compressed.ir_version == 8
    check_full(compressed)


def test_compressing_a_compressed_file_again_keeps_function_names_apart(rng: np.random.Generator) -> None:
    """With ``--force`` the weights left dense are compressed in a second run; its functions get names of their own."""
    model = stacked_model(rng)
    first = jlcm_onnx.compress(model, CONFIG.replace(include=("w0", "w1")))
    second = jlcm_onnx.compress(first.model, CONFIG, force=True)
    names = [f.name for f in second.model.functions]
    assert len(names) == len(set(names)) and len(second.report.compressed) >= 3
    check_full(second.model)
    feed = {"ids": np.array([5, 6], dtype=np.int64)}
    np.testing.assert_array_equal(run(second.model, feed)[0], run(inlined(second.model), feed)[0])


def test_a_compressed_file_upgraded_for_the_fast_path_keeps_its_decoders(rng: np.random.Generator) -> None:
    """The fast path raises the opset with onnx's converter, which drops functions: they are inlined first."""
    model = stacked_model(rng)
    first = jlcm_onnx.compress(model, CONFIG.replace(include=("w0", "w1")))
    second = jlcm_onnx.compress(first.model, CompressionConfig(speed="fast", bits=4, min_elements=64), force=True)
    assert not any(n.domain == DOMAIN for n in second.model.graph.node if n.op_type.startswith("DecodeWeight"))
    feed = {"ids": np.array([5, 6], dtype=np.int64)}
    got, want = run(second.model, feed)[0], run(first.model, feed)[0]
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98


def test_a_model_without_the_ai_onnx_domain_passes_through(rng: np.random.Generator) -> None:
    """An ai.onnx.ml-only model (no default-domain opset to give a function) has nothing to decode and is unchanged."""
    node = helper.make_node("Binarizer", ["X"], ["Y"], domain="ai.onnx.ml", threshold=0.5)
    graph = helper.make_graph([node], "ml", [value("X", FLOAT, [4])], [value("Y", FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 3)])
    result = jlcm_onnx.compress(model, CONFIG)
    assert not result.report.compressed and not result.model.functions
