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
