"""The Llama-shaped scale model of ``models/llama_shaped.py``, built tiny: it exports, its table is tied to the head,
and it compresses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import jlcm_onnx

from conftest import script

pytest.importorskip("transformers")
llama_shaped = script("models/llama_shaped.py")

TINY = llama_shaped.Shape(vocab=2048, hidden=64, layers=1, intermediate=128, heads=2, kv_heads=1, head_dim=32)


def test_the_tiny_llama_exports_with_a_tied_table_and_compresses(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    llama_shaped.export(path, TINY)
    model = onnx.load(path)
    table = next(t for t in model.graph.initializer if tuple(t.dims) == (TINY.vocab, TINY.hidden))
    readers = {n.op_type for n in model.graph.node if table.name in n.input}
    assert readers == {"Gather", "Transpose"}  # the embedding and the tied head read one table
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert abs(weights - TINY.parameters()) < 0.01 * TINY.parameters()
    result = jlcm_onnx.compress(path, jlcm_onnx.CompressionConfig(bits=4))
    assert result.report.ratio > 2 and table.name in {r.name for r in result.report.compressed}


def test_an_fp16_model_is_built_in_fp16_and_the_scale_check_finds_every_tensor(tmp_path: Path) -> None:
    """A float16 export holds float16 weights (built so from the start: a 7B model in float32 would not fit), and
    ``bench/scale.py``'s check passes on its compressed file and fails on a file encoded differently."""
    scale = script("bench/scale.py")
    path = tmp_path / "tiny16.onnx"
    llama_shaped.export(path, TINY, fp16=True)
    types = {t.data_type for t in onnx.load(path).graph.initializer if len(t.dims) == 2}
    assert types == {onnx.TensorProto.FLOAT16}
    output = tmp_path / "tiny16-4bit.onnx"
    jlcm_onnx.compress(path, jlcm_onnx.CompressionConfig(bits=4, min_elements=64)).save(output)
    found = scale.verify(path, output, check_tensors=True)
    assert found["runs"] and found["tensors_checked"] == found["tensors_in_metadata"] > 5
    assert found["tensors_mismatched"] == []
    other = tmp_path / "tiny16-3bit.onnx"
    jlcm_onnx.compress(path, jlcm_onnx.CompressionConfig(bits=3, min_elements=64)).save(other)
    model = onnx.load(other)
    for prop in model.metadata_props:  # claim 4 bits: every tensor's arrays then differ from a 4-bit encoding
        if prop.key.endswith("config"):
            prop.value = prop.value.replace('"bits": 3', '"bits": 4')
    onnx.save(model, other)
    assert len(scale.verify(path, other, check_tensors=True)["tensors_mismatched"]) == found["tensors_checked"]
