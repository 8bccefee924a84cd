"""CUDA: compressed models run with onnxruntime's CUDA provider as on CPU, and calibration runs on the GPU.

Skipped (with the reason in the test summary) without onnxruntime-gpu's CUDAExecutionProvider and a torch CUDA
device; run it on a GPU machine with ``python -m pytest -q -m cuda``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_recurrent import recurrent_model

import jlcm_onnx
from jlcm_onnx import CompressionConfig

from conftest import matmul_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="CUDA tests need onnxruntime-gpu (no CUDAExecutionProvider in this onnxruntime)"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tests need a CUDA device visible to torch"),
]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def outputs(model: onnx.ModelProto, feed: dict[str, np.ndarray], providers: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=providers)
    assert session.get_providers()[0] == providers[0]
    return session.run(None, feed)


@pytest.mark.parametrize("settings", [{"bits": 4}, {"bits": 3, "block_size": 32}, {"speed": "fast", "bits": 4}])
def test_compressed_matmul_runs_on_cuda_as_on_cpu(settings: dict, rng: np.random.Generator) -> None:
    model = jlcm_onnx.compress(matmul_model(rng.standard_normal((512, 256)).astype(np.float32)),
                               CompressionConfig(**settings)).model
    feed = {"X": rng.standard_normal((8, 512)).astype(np.float32)}
    np.testing.assert_allclose(outputs(model, feed, CUDA)[0], outputs(model, feed, ["CPUExecutionProvider"])[0],
                               rtol=1e-3, atol=1e-3)


def test_compressed_lstm_runs_on_cuda_as_on_cpu(rng: np.random.Generator) -> None:
    model = jlcm_onnx.compress(recurrent_model("LSTM", rng, hidden=64, inputs=64),
                               CompressionConfig(bits=4, min_elements=64)).model
    feed = {"X": rng.standard_normal((5, 2, 64)).astype(np.float32)}
    np.testing.assert_allclose(outputs(model, feed, CUDA)[0], outputs(model, feed, ["CPUExecutionProvider"])[0],
                               rtol=1e-3, atol=1e-4)


def test_calibration_on_cuda_matches_cpu(rng: np.random.Generator) -> None:
    """Statistics in onnxruntime on CUDA and learning in torch on CUDA give the CPU run's layer errors closely."""
    model = matmul_model(rng.standard_normal((256, 128)).astype(np.float32))
    feeds = [{"X": rng.standard_normal((16, 256)).astype(np.float32)} for _ in range(8)]
    config = CompressionConfig(bits=3, learning_steps=20)
    on_cpu = jlcm_onnx.compress(model, config, feeds, device="cpu").report.compressed[0]
    on_cuda = jlcm_onnx.compress(model, config, feeds, device="cuda").report.compressed[0]
    assert on_cuda.layer_error == pytest.approx(on_cpu.layer_error, rel=0.05)
