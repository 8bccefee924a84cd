"""The jlcm-onnx command line: same defaults as the API, machine-readable output, stable exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import jlcm_onnx
from jlcm_onnx.cli import main

from conftest import matmul_model


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    weight = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    path = tmp_path / "model.onnx"
    onnx.save(matmul_model(weight), path)
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_compress_writes_the_same_model_as_the_api(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    code, stdout, _ = invoke("compress", model_path, "-o", out, "--min-elements", 16, "--quiet")
    assert code == 0 and "wrote" in stdout
    api = jlcm_onnx.compress(model_path, jlcm_onnx.CompressionConfig(min_elements=16)).model
    assert out.read_bytes() == api.SerializeToString()


def test_json_report_is_machine_readable(model_path: Path, tmp_path: Path) -> None:
    code, stdout, _ = invoke("compress", model_path, "-o", tmp_path / "o.onnx", "--bits", 3,
                             "--min-elements", 16, "--json", "--quiet")
    report = json.loads(stdout)
    assert code == 0
    assert report["config"]["bits"] == 3
    assert report["compressed_file_bytes"] == (tmp_path / "o.onnx").stat().st_size
    assert [t["status"] for t in report["tensors"]] == ["compressed"]


def test_config_file_and_flag_override(model_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"bits": 2, "min_elements": 16, "groups": 4}))
    code, stdout, _ = invoke("compress", model_path, "-o", tmp_path / "o.onnx", "--config", config, "--bits", 5,
                             "--json", "--quiet")
    report = json.loads(stdout)
    assert code == 0
    assert (report["config"]["bits"], report["config"]["groups"]) == (5, 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "9"], "config field 'bits' = 9"),
        (["--groups", "0"], "config field 'groups' = 0"),
        (["--block-size", "1"], "config field 'block_size' = 1"),
        (["--speed", "fast", "--bits", "3"], "config field 'bits' = 3"),
        (["--speed", "fast", "--ratio", "6"], "config field 'target_ratio' = 6.0"),
    ],
)
def test_bad_values_exit_2_with_one_line(model_path: Path, tmp_path: Path, args: list[str], message: str) -> None:
    code, _, stderr = invoke("compress", model_path, "-o", tmp_path / "o.onnx", *args)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_fast_file_and_its_inspect_table(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "fast.onnx"
    code, stdout, _ = invoke("compress", model_path, "-o", out, "--speed", "fast", "--affine-offsets", "float",
                             "--min-elements", 16, "--json", "--quiet")
    (tensor,) = json.loads(stdout)["tensors"]
    assert code == 0 and tensor["encoding"] == "affine blocks of 32, float offsets"
    code, stdout, _ = invoke("inspect", out)
    assert code == 0 and "affine blocks of 32, float offsets" in stdout


def test_inspect_plot(model_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out, picture = tmp_path / "o.onnx", tmp_path / "layers.png"
    invoke("compress", model_path, "-o", out, "--bits", 3, "--min-elements", 16, "--quiet")
    code, stdout, _ = invoke("inspect", out, "--plot", picture)
    assert code == 0 and "codebook values" in stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, stderr = invoke("inspect", model_path, "--plot", tmp_path / "plain.png")
    assert code == 2 and "not compressed" in stderr and not (tmp_path / "plain.png").exists()


def test_bad_inputs_exit_2(model_path: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    before = model_path.read_bytes()
    cases = [
        (["compress", tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx"], "does not exist"),
        (["compress", garbage, "-o", tmp_path / "o.onnx"], "not a readable ONNX model"),
        (["compress", model_path, "-o", model_path], "is the input model"),
        (["compress", model_path, "-o", tmp_path / "no" / "such" / "o.onnx"], "does not exist"),
        (["inspect", tmp_path / "missing.onnx"], "does not exist"),
    ]
    for args, message in cases:
        code, _, stderr = invoke(*args)
        assert code == 2, args
        assert message in stderr and stderr.startswith("error: ")
    assert model_path.read_bytes() == before


def test_a_compressed_input_exits_2_unless_forced(model_path: Path, tmp_path: Path) -> None:
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    assert invoke("compress", model_path, "-o", once, "--min-elements", 16, "--quiet")[0] == 0
    code, stdout, stderr = invoke("compress", once, "-o", twice, "--quiet")
    assert code == 2 and not twice.exists() and stdout == ""
    assert stderr.count("\n") == 1 and "already compressed by jlcm-onnx" in stderr and "--force" in stderr
    code, _, _ = invoke("compress", once, "-o", twice, "--force", "--quiet")
    assert code == 0 and twice.exists()


def test_usage_error_exits_2(model_path: Path) -> None:
    code, _, _ = invoke("compress", model_path)  # missing -o
    assert code == 2


def test_internal_error_exits_1(model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("jlcm_onnx.cli.compress", broken)
    code, _, stderr = invoke("compress", model_path, "-o", tmp_path / "o.onnx")
    assert code == 1
    assert stderr.strip() == "internal error: RuntimeError: boom"


def test_inspect_compressed_and_plain_models(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    invoke("compress", model_path, "-o", out, "--bits", 3, "--min-elements", 16, "--quiet")
    code, stdout, _ = invoke("inspect", out, "--json")
    description = json.loads(stdout)
    assert code == 0 and description["compressed"]
    assert description["tensors"][0] | {"bits": 3, "groups": 48, "shape": [64, 48]} == description["tensors"][0]
    code, stdout, _ = invoke("inspect", model_path)
    assert code == 0 and "uncompressed model" in stdout and "compress" in stdout
    code, stdout, _ = invoke("inspect", out)
    assert code == 0 and "codebook values" in stdout


def test_a_run_estimated_above_max_memory_is_refused_before_it_starts(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    code, _, stderr = invoke("compress", str(model_path), "-o", str(out), "--max-memory", "10MB")
    assert code == 2 and stderr.startswith("error: this run needs about ") and "max_memory 10.00 MB" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()
