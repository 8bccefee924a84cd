"""Compressed files run in onnxruntime's mobile ``.ort`` format, as written by its own converter.

``python -m onnxruntime.tools.convert_onnx_models_to_ort`` writes two files: ``model.ort``, optimized at conversion
("Fixed" style), and ``model.with_runtime_opt.ort``, whose optimizations are replayed at load ("Runtime" style). Each
must load in a plain session and compute what the ``.onnx`` file computes. The format cannot hold a UINT4 tensor that
survives into the file: a fast file's UINT4 codes are fused into MatMulNBits in the Fixed file (and its other tensors
are uint8), but the Runtime file keeps them as they are, so a fast file runs from ``model.ort`` only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig

from conftest import FLOAT, INT64, make_model, tensor, value


def mixed_model(rng: np.random.Generator) -> onnx.ModelProto:
    """An embedding Gather, a MatMul and a Conv, the consumers a mobile model holds."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"], name="embed"),
        helper.make_node("MatMul", ["embedded", "projection"], ["y_text"], name="project"),
        helper.make_node("Conv", ["image", "kernel"], ["y_image"], pads=[1, 1, 1, 1], name="conv"),
    ]
    weights = {"table": (200, 64), "projection": (64, 32), "kernel": (16, 8, 3, 3)}
    return make_model(
        nodes,
        [value("ids", INT64, ["N"]), value("image", FLOAT, [1, 8, 10, 10])],
        [value("y_text", FLOAT, ["N", 32]), value("y_image", FLOAT, [1, 16, 10, 10])],
        [tensor(name, rng.standard_normal(shape).astype(np.float32)) for name, shape in weights.items()],
    )


def to_ort_format(path: Path) -> dict[str, Path]:
    """The converter's files by style: optimized at conversion ("Fixed") and with runtime optimizations ("Runtime")."""
    subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(path),
                    "--output_dir", str(path.parent / "ort")], check=True, capture_output=True)
    folder = path.parent / "ort"
    return {"Fixed": folder / f"{path.stem}.ort", "Runtime": folder / f"{path.stem}.with_runtime_opt.ort"}


def outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize(("config", "styles"), [
    (CompressionConfig(bits=4, min_elements=256), ("Fixed", "Runtime")),
    (CompressionConfig(bits=4, min_elements=256, speed="fast"), ("Fixed",)),
], ids=["small", "fast"])
def test_a_compressed_file_converts_to_ort_format_and_runs(tmp_path: Path, config: CompressionConfig,
                                                           styles: tuple[str, ...]) -> None:
    rng = np.random.default_rng(0)
    result = jlcm_onnx.compress(mixed_model(rng), config)
    assert all(record.status == "compressed" for record in result.report.tensors)
    path = tmp_path / "compressed.onnx"
    result.save(path)
    feeds = {"ids": np.array([3, 199, 0]), "image": rng.standard_normal((1, 8, 10, 10)).astype(np.float32)}
    expected = outputs(path, feeds)
    converted = to_ort_format(path)
    for style in styles:
        for got, want in zip(outputs(converted[style], feeds), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=style)
