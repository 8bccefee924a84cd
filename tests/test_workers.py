"""Encoding on worker processes or a local Ray cluster writes the bytes the threads of one process write; a job that
fails there is named."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.errors import ConfigError, JlcmError
from jlcm_onnx.workers import WorkerError, Workers, map_jobs

from conftest import FLOAT, INT64, make_model, model_hash, tensor, value


def table_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(W1) -> Relu -> MatMul(W2) -> MatMul(table^T): a tied head, opset 21."""
    weights = {"table": rng.standard_normal((256, 64)), "W1": rng.standard_normal((64, 128)),
               "W2": rng.standard_normal((128, 64))}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["o"]),
             helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["o", "table_t"], ["logits"])]
    return make_model(nodes, [value("ids", INT64, ["N"])], [value("logits", FLOAT, ["N", 256])],
                      [tensor(name, array.astype(np.float32)) for name, array in weights.items()], opset=21)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("workers") / "model.onnx"
    onnx.save(table_mlp(np.random.default_rng(0)), path)
    return path


@pytest.fixture(scope="module")
def calibration() -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(1).integers(0, 256, (48,))}


@pytest.mark.parametrize(("settings", "calibrated"), [
    ({"bits": 3}, False), ({"bits": 4, "speed": "fast"}, False),
    ({"bits": 3, "block_size": 32, "outlier_fraction": 0.01}, True),
])
def test_worker_processes_write_the_same_bytes_as_threads(model_file: Path, calibration, settings: dict,
                                                          calibrated: bool) -> None:
    data = calibration if calibrated else None
    threads = jlcm_onnx.compress(model_file, CompressionConfig(**settings), data)
    processes = jlcm_onnx.compress(model_file, CompressionConfig(**settings, workers=2), data)
    assert model_hash(processes.model) == model_hash(threads.model)
    assert processes.report.to_dict()["tensors"] == threads.report.to_dict()["tensors"]


def test_a_local_ray_cluster_writes_the_same_bytes_as_threads(model_file: Path, calibration) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for data in (None, calibration):
            threads = jlcm_onnx.compress(model_file, CompressionConfig(bits=3), data)
            on_ray = jlcm_onnx.compress(model_file, CompressionConfig(bits=3, ray_address="local"), data)
            assert model_hash(on_ray.model) == model_hash(threads.model)
        with pytest.raises(WorkerError, match=r"^job -4 failed on the Ray cluster: ValueError: math domain error"):
            map_jobs(math.sqrt, [4.0, -4.0, 9.0], Workers(ray_address="local"), description="roots",
                     name=lambda x: f"job {x:g}")
    finally:
        ray.shutdown()


def test_a_job_that_fails_in_a_worker_process_is_named() -> None:
    assert map_jobs(math.sqrt, [4.0, 9.0], Workers(processes=2), description="roots", name=str) == [2.0, 3.0]
    with pytest.raises(WorkerError, match=r"^job -4 failed in a worker process: ValueError: math domain error"):
        map_jobs(math.sqrt, [4.0, -4.0, 9.0], Workers(processes=2), description="roots", name=lambda x: f"job {x:g}")
    assert issubclass(WorkerError, JlcmError)  # the CLI's one line and exit code 2


@pytest.mark.parametrize(("fields", "name"), [
    ({"workers": 0}, "workers"), ({"workers": 1.5}, "workers"), ({"workers": 2, "ray_address": "local"}, "workers"),
    ({"ray_address": ""}, "ray_address"),
])
def test_bad_worker_settings_are_refused(fields: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=f"'{name}'"):
        CompressionConfig(**fields)


def test_worker_settings_are_not_stored_in_the_output(model_file: Path) -> None:
    result = jlcm_onnx.compress(model_file, CompressionConfig(bits=3, workers=1))
    stored = jlcm_onnx.pipeline.metadata.read_metadata(result.model)["config"]
    assert "workers" not in stored and "ray_address" not in stored


def test_ray_without_the_package_is_a_one_line_error(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(JlcmError, match=r"pip install 'jlcm-onnx\[ray\]'"):
        jlcm_onnx.compress(model_file, CompressionConfig(bits=3, ray_address="local"))
