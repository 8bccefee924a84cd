"""Shared helpers of the test suite: building small ONNX models, running them in onnxruntime, and the reference
(dequantized) weights a compressed model must reproduce."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from jlcm_onnx.analysis.grouping import cluster_rows
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.codebook import encode_matrix, equal_group_sizes

OPSET = 17
IR_VERSION = 9
#: The repository's root: bench/ and models/ hold scripts some tests import (see :func:`script`).
ROOT = Path(__file__).resolve().parent.parent

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
INT64 = TensorProto.INT64


def script(relative: str) -> ModuleType:
    """A script of the repository (``"bench/memory.py"``, ``"models/minilm.py"``) imported as a module named after its
    file, once; while it loads, its own folder is searched first for the scripts it imports, as when it runs."""
    path = ROOT / relative
    if path.stem in sys.modules:
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


# ---------------------------------------------------------------------------------------------------------- models


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = OPSET,
    name: str = "test",
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    model.producer_name = "jlcm-onnx-tests"
    onnx.checker.check_model(model, full_check=True)
    return model


def value(name: str, elem_type: int, shape: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def matmul_model(weight: np.ndarray, batch: int | str = "N", name: str = "W") -> onnx.ModelProto:
    """``Y = X @ W`` with W [in, out] an initializer; X and Y have W's dtype."""
    dtype = helper.np_dtype_to_tensor_dtype(weight.dtype)
    rows, cols = weight.shape
    return make_model(
        [helper.make_node("MatMul", ["X", name], ["Y"], name="matmul")],
        [value("X", dtype, [batch, rows])],
        [value("Y", dtype, [batch, cols])],
        [tensor(name, weight)],
    )


def correlated_inputs(samples: int, cols: int, seed: int) -> np.ndarray:
    """Inputs that mostly live in a few directions, as real activations do: far from what weight MSE assumes."""
    directions = np.random.default_rng(0)
    mixing = directions.standard_normal((8, cols)) * 3 + directions.standard_normal((1, cols))
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((samples, 8)) @ mixing + 0.1 * rng.standard_normal((samples, cols))).astype(np.float32)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def check_full(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def model_hash(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


# ---------------------------------------------------------------------------------------------------------- graphs


def all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from all_graphs(sub)


def all_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for g in all_graphs(model.graph) for t in g.initializer]


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for g in all_graphs(model.graph) for n in g.node]


def stored_float_arrays(model: onnx.ModelProto) -> list[np.ndarray]:
    """Every float array stored in the model: initializers and Constant-node values, in every (sub)graph."""
    arrays = [numpy_helper.to_array(t) for t in all_initializers(model)]
    for node in all_nodes(model):
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    arrays.append(numpy_helper.to_array(attribute.t))
    return [a for a in arrays if a.dtype.kind == "f"]


def contains_array(model: onnx.ModelProto, array: np.ndarray) -> bool:
    """True when ``array`` (same shape and values) is stored anywhere in ``model`` as a dense float tensor."""
    return any(a.shape == array.shape and np.array_equal(a, array) for a in stored_float_arrays(model))


def replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` where the initializer or Constant named ``name`` (in any graph) holds ``array``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    found = 0
    for graph in all_graphs(copy.graph):
        for index, init in enumerate(graph.initializer):
            if init.name == name:
                graph.initializer[index].CopyFrom(tensor(name, array.astype(numpy_helper.to_array(init).dtype)))
                found += 1
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                for attribute in node.attribute:
                    if attribute.name == "value":
                        attribute.t.CopyFrom(tensor(name, array.astype(numpy_helper.to_array(attribute.t).dtype)))
                        found += 1
    assert found == 1, f"{name} found {found} times"
    return copy


# ---------------------------------------------------------------------------------------------------------- weights


def expected_groups(rows: int, cols: int, config: CompressionConfig) -> int:
    """Codebooks per tensor: ``config.groups``, or one per row when rows hold at least a codebook's worth of weights,
    else rows pooled so each codebook spans 2**bits weights."""
    if config.groups is not None:
        return min(config.groups, rows)
    span = 1 << config.bits
    return rows if cols >= span else max(1, rows * cols // span)


def dequantized(weight: np.ndarray, row_axis: int, config: CompressionConfig, outliers: bool = True,
                outliers_per_row: bool = False) -> np.ndarray:
    """The weight the compressed model must decode: the codebook encoding of ``weight`` (rows clustered into groups
    when the config re-orders them), in ``weight``'s layout and row order; its outliers, if any, the farthest of the
    whole weight or as many in every row."""
    moved = np.moveaxis(weight, row_axis, 0)
    matrix = moved.reshape(weight.shape[row_axis], -1).astype(np.float32)
    groups = expected_groups(*matrix.shape, config)
    order = np.arange(matrix.shape[0])
    sizes = equal_group_sizes(matrix.shape[0], groups)
    if config.reorder and 1 < groups < matrix.shape[0]:
        clusters = cluster_rows(matrix, groups)
        order, sizes = clusters.permutation, clusters.sizes
    encoded = encode_matrix(
        matrix[order],
        config.bits,
        sizes,
        np.dtype(config.codebook_dtype),
        config.kmeans_iterations,
        outlier_fraction=config.outlier_fraction if outliers else 0.0,
        outliers_per_row=outliers_per_row,
    )
    decoded = np.empty_like(matrix)
    decoded[order] = encoded.decode()
    return np.moveaxis(decoded.reshape(moved.shape), 0, row_axis).astype(weight.dtype)


def discrete_weight(
    shape: Sequence[int],
    row_axis: int,
    bits: int,
    rng: np.random.Generator,
    groups: int | None = None,
    dtype: type = np.float32,
) -> np.ndarray:
    """A weight whose output rows (along ``row_axis``) in each codebook group take at most ``2**bits`` distinct values.

    Values are float16-representable, so a float16 codebook holds them exactly. Where a group has at least ``2**bits``
    elements, every one of its values occurs (so every code, including the all-ones one, is used).
    """
    shape = tuple(shape)
    rows = shape[row_axis]
    cols = int(np.prod(shape)) // rows
    sizes = equal_group_sizes(rows, groups)
    levels = 1 << bits
    matrix = np.empty((rows, cols), dtype=np.float32)
    start = 0
    for size in sizes:
        candidates = np.unique(rng.standard_normal(4 * levels + 64).astype(np.float16))
        candidates = candidates[np.isfinite(candidates)]
        values = rng.choice(candidates, size=levels, replace=False).astype(np.float32)
        count = size * cols
        picks = rng.integers(0, levels, size=count)
        head = min(levels, count)
        picks[rng.permutation(count)[:head]] = rng.permutation(levels)[:head]
        matrix[start:start + size] = values[picks].reshape(size, cols)
        start += size
    moved_shape = (rows, *[s for i, s in enumerate(shape) if i != row_axis])
    return np.moveaxis(matrix.reshape(moved_shape), 0, row_axis).astype(dtype)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
