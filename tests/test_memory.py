"""The compressed model stays compressed in memory with DEFAULT onnxruntime options: the decode subgraph is not
constant-folded at load, and the process holds far less than the dense model (measured in fresh processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jlcm_onnx

from conftest import script

memory = script("bench/memory.py")

SIZE, LAYERS = 768, 12  # 28 MB of fp32 weights: large enough to see in RSS, fast to compress


def mlp(layers: int = LAYERS) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "X"
    for i in range(layers):
        weight = (rng.standard_normal((SIZE, SIZE)) / np.sqrt(SIZE)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"]))
        current = f"a{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", SIZE])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", SIZE])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("memory")
    dense, compressed = folder / "dense.onnx", folder / "compressed.onnx"
    onnx.save(mlp(), dense)
    jlcm_onnx.compress(dense, jlcm_onnx.CompressionConfig(bits=4)).save(compressed)
    return dense, compressed


def test_decoder_is_not_folded_at_load(models: tuple[Path, Path]) -> None:
    dense, compressed = models
    stats = memory.folding_stats(compressed)
    assert stats["gather_elements"] >= LAYERS  # one per layer, or one per column block of a large layer
    assert stats["float_initializer_bytes"] < 0.05 * memory.folding_stats(dense)["float_initializer_bytes"]


def test_compressed_model_uses_less_memory_than_dense(models: tuple[Path, Path]) -> None:
    dense, compressed = models
    dense_cost = memory.measure(dense, runs=3, warmup=1, batch=1, seq=1)
    compressed_cost = memory.measure(compressed, runs=3, warmup=1, batch=1, seq=1)
    assert compressed_cost["load_peak_net"] < dense_cost["load_peak_net"]
    assert compressed_cost["after_load_net"] < 0.5 * dense_cost["after_load_net"]
    # after running, the allocator keeps the decode buffers of about one layer: still well below dense
    assert compressed_cost["steady_net"] < 0.75 * dense_cost["steady_net"]
