"""What a reader of the output sees: layer names from the exporter's scopes, and no exporter debug metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.ir.weight_sites import module_path
from jlcm_onnx.pipeline.describe import describe_model

from conftest import all_nodes, matmul_model

STACK = "File \"/home/someone/model.py\", line 12, in forward\n" * 40


def exported_like_dynamo(rng: np.random.Generator) -> onnx.ModelProto:
    """A MatMul model annotated as torch's dynamo exporter does: debug entries on the node, a value and the graph,
    plus a user's own entries on the model and the node that must survive."""
    model = matmul_model(rng.standard_normal((64, 32)).astype(np.float32))
    (node,) = model.graph.node
    for key, value in (("pkg.torch.onnx.stack_trace", STACK), ("pkg.torch.onnx.fx_node", "%linear : call_function"),
                       ("pkg.torch.onnx.name_scopes", "['', 'encoder.layer.3', 'encoder.layer.3.query', 'linear']"),
                       ("namespace", ": M/encoder.layer.3.query: Linear"), ("team.owner", "search")):
        node.metadata_props.add(key=key, value=value)
    model.graph.metadata_props.add(key="pkg.torch.export.ExportedProgram.range_constraints", value="{}")
    model.graph.input[0].metadata_props.add(key="pkg.torch.onnx.original_node_name", value="x")
    model.metadata_props.add(key="model.version", value="7")
    return model


def debug_entries(model: onnx.ModelProto) -> list[str]:
    holders = [model.graph, *model.graph.input, *model.graph.value_info, *model.graph.initializer, *all_nodes(model)]
    return [p.key for h in holders for p in h.metadata_props if p.key.startswith("pkg.torch.") or p.key == "namespace"]


def test_debug_metadata_is_dropped_and_said(rng: np.random.Generator) -> None:
    model = exported_like_dynamo(rng)
    result = jlcm_onnx.compress(model, CompressionConfig(min_elements=64))
    assert debug_entries(result.model) == []
    assert len(debug_entries(model)) == 6  # the input is not modified
    (note,) = [n for n in result.report.notes if "debug metadata" in n]
    assert "6 entries" in note and "--keep-debug-metadata" in note
    assert {p.key: p.value for p in result.model.metadata_props}["model.version"] == "7"
    kept = [p.key for n in result.model.graph.node for p in n.metadata_props]
    assert kept == ["team.owner"]
    assert result.report.compressed_file_bytes < model.ByteSize() - len(STACK)


def test_keep_debug_metadata(rng: np.random.Generator) -> None:
    model = exported_like_dynamo(rng)
    result = jlcm_onnx.compress(model, CompressionConfig(min_elements=64, keep_debug_metadata=True))
    assert sorted(debug_entries(result.model)) == sorted(debug_entries(model))
    assert not [n for n in result.report.notes if "debug metadata" in n]


def test_report_and_inspect_name_the_layer(rng: np.random.Generator, tmp_path) -> None:  # noqa: ANN001
    result = jlcm_onnx.compress(exported_like_dynamo(rng), CompressionConfig(min_elements=64))
    (record,) = result.report.compressed
    assert record.layer == "encoder.layer.3.query (MatMul)"
    assert "encoder.layer.3.query (MatMul)" in result.report.format_table()
    assert json.loads(result.report.to_json())["tensors"][0]["layer"] == record.layer
    path = tmp_path / "out.onnx"
    result.save(path)
    description = describe_model(path)
    assert description.tensors[0]["layer"] == record.layer
    assert record.layer in description.format_table()


@pytest.mark.parametrize(("name", "scopes", "expected"), [
    ("node_MatMul_1", "['', 'layers.0', 'layers.0.query', 'linear']", "layers.0.query"),
    ("node_add", "['', 'add']", "node_add"),  # a root-level op: no module, the node's name
    ("/encoder/layer.0/attention/self/query/MatMul", None, "encoder/layer.0/attention/self/query"),  # TorchScript
    ("", None, "y"),  # unnamed: its first output
    ("n", "not a list", "n"),
])
def test_module_path(name: str, scopes: str | None, expected: str) -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name=name)
    if scopes is not None:
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes)
    assert module_path(node) == expected
