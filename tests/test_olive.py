"""The Olive pass: a workflow with ``JlcmCompression`` writes the same model ``jlcm_onnx.compress`` does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("olive", reason="the olive extra (pip install 'jlcm-onnx[olive]') is not installed")

import jlcm_onnx  # noqa: E402
from jlcm_onnx.olive import main, package_config, run_workflow  # noqa: E402

from conftest import matmul_model, model_hash  # noqa: E402


@pytest.fixture
def model_file(tmp_path: Path, rng: np.random.Generator) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(matmul_model(rng.standard_normal((96, 64)).astype(np.float32)), path)
    return path


def workflow(model_file: Path, tmp_path: Path, **parameters: object) -> dict:
    return {"input_model": {"type": "ONNXModel", "model_path": str(model_file)},
            "passes": {"jlcm": {"type": "JlcmCompression", **parameters}},
            "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "log_severity_level": 3}


def test_workflow_output_is_the_compressed_model(model_file: Path, tmp_path: Path) -> None:
    output = run_workflow(workflow(model_file, tmp_path, bits=3, min_elements=64))
    assert output.has_output_model()
    written = onnx.load(tmp_path / "out" / "model.onnx")
    expected = jlcm_onnx.compress(model_file, jlcm_onnx.CompressionConfig(bits=3, min_elements=64)).model
    assert model_hash(written) == model_hash(expected)


def test_bad_parameter_is_a_clear_error(model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="jlcm-onnx: config field 'bits' = 9"):
        run_workflow(workflow(model_file, tmp_path, bits=9))


def test_package_config_file_for_the_olive_cli(tmp_path: Path) -> None:
    path = tmp_path / "jlcm-olive.json"
    assert main([str(path)]) == 0
    written = json.loads(path.read_text())
    assert written["passes"]["JlcmCompression"]["module_path"] == "jlcm_onnx.olive.JlcmCompression"
    assert set(package_config()["passes"]) - {"JlcmCompression"}  # Olive's own passes are kept
