"""jlcm-onnx verify: output fidelity numbers checked against an independent computation, exactness on a weight the
codebooks hold exactly, file sizes, synthetic inputs, and the CLI's exit codes and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

import jlcm_onnx
from jlcm_onnx import cli
from jlcm_onnx.analysis.calibration import CalibrationData, load_calibration
from jlcm_onnx.errors import CalibrationError, JlcmError, ModelError
from jlcm_onnx.pipeline.verify import synthetic_feeds, verify

from conftest import FLOAT, INT64, discrete_weight, make_model, matmul_model, run, tensor, value

CONFIG = jlcm_onnx.CompressionConfig(bits=2, min_elements=16)


@pytest.fixture()
def weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((32, 24)).astype(np.float32)


@pytest.fixture()
def paths(tmp_path: Path, weight: np.ndarray) -> tuple[Path, Path]:
    original, compressed = tmp_path / "model.onnx", tmp_path / "model-2bit.onnx"
    onnx.save(matmul_model(weight), original)
    jlcm_onnx.compress(original, CONFIG).save(compressed)
    return original, compressed


def test_metrics_match_an_independent_computation(paths: tuple[Path, Path], tmp_path: Path) -> None:
    original, compressed = paths
    np.savez(tmp_path / "data.npz", X=np.random.default_rng(1).standard_normal((40, 32)).astype(np.float32))
    report = verify(original, compressed, tmp_path / "data.npz", samples=30, seed=2, batch_size=4, repeats=2)
    data = load_calibration(tmp_path / "data.npz", onnx.load(original), samples=30, seed=2)
    x = np.concatenate([run(onnx.load(original), s)[0] for s in data]).astype(np.float64)
    y = np.concatenate([run(onnx.load(compressed), s)[0] for s in data]).astype(np.float64)
    cosines = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    (out,) = report.outputs
    assert out.name == "Y" and report.samples == 30 and out.shape == (4, 24)
    assert out.max_abs_error == pytest.approx(np.abs(y - x).max(), rel=1e-6)
    assert out.mean_abs_error == pytest.approx(np.abs(y - x).mean(), rel=1e-6)
    assert out.cosine == pytest.approx(cosines.mean(), rel=1e-6)
    assert out.sqnr_db == pytest.approx(10 * np.log10((x**2).sum() / ((y - x) ** 2).sum()), rel=1e-6)
    assert out.top1_agreement == pytest.approx((x.argmax(1) == y.argmax(1)).mean())
    assert 0 < out.max_abs_error and out.cosine < 0.9999 and 0 < out.sqnr_db < 40  # 2 bits is visibly lossy
    assert out.nonfinite == 0


def test_a_weight_the_codebooks_hold_exactly_verifies_exact(tmp_path: Path) -> None:
    config = jlcm_onnx.CompressionConfig(bits=3, min_elements=16, outlier_fraction=0.0)
    weight = discrete_weight((32, 24), 1, 3, np.random.default_rng(5))
    model = matmul_model(weight)
    report = verify(model, jlcm_onnx.compress(model, config).model, samples=6, repeats=1)
    (out,) = report.outputs
    assert out.max_abs_error == 0.0 and out.cosine == pytest.approx(1.0) and out.top1_agreement == 1.0
    assert out.to_dict()["exact"] is True and out.to_dict()["sqnr_db"] is None
    assert "exact" in report.format_table()


def test_top1_agreement_counts_changed_argmax() -> None:
    weight = np.eye(4, dtype=np.float32)
    swapped = weight[:, [1, 0, 2, 3]]  # outputs 0 and 1 trade places
    feeds = [{"X": np.array([[5, 1, 0, 0]], np.float32)}, {"X": np.array([[0, 0, 5, 1]], np.float32)}]
    report = verify(matmul_model(weight), matmul_model(swapped), feeds, repeats=1)
    assert report.outputs[0].top1_agreement == 0.5
    assert report.outputs[0].max_abs_error == 4.0


def named_output(weight: np.ndarray, output: str) -> onnx.ModelProto:
    model = matmul_model(weight)
    model.graph.node[0].output[0] = model.graph.output[0].name = output
    return model


def test_metrics_follow_the_output_kind() -> None:
    """Logits get top-1 and KL; embeddings neither (an argmax over hidden units means nothing)."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((8, 6)).astype(np.float32)
    noisy = weight + 0.3 * rng.standard_normal(weight.shape).astype(np.float32)
    feeds = [{"X": rng.standard_normal((5, 8)).astype(np.float32)}]
    logits = verify(named_output(weight, "logits"), named_output(noisy, "logits"), feeds, repeats=1).outputs[0]
    x, y = feeds[0]["X"] @ weight.astype(np.float64), feeds[0]["X"] @ noisy.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(y - y.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    assert logits.kind == "logits" and logits.kl_divergence == pytest.approx((p * np.log(p / q)).sum(1).mean())
    assert logits.top1_agreement == pytest.approx((x.argmax(1) == y.argmax(1)).mean())
    hidden = verify(named_output(weight, "last_hidden_state"), named_output(noisy, "last_hidden_state"), feeds,
                    repeats=1).outputs[0]
    assert hidden.kind == "embeddings" and hidden.top1_agreement is None and hidden.kl_divergence is None


def test_top1_counts_only_real_positions() -> None:
    """Padded positions (attention mask 0) of a [batch, sequence, classes] output are not compared, by any metric."""
    weight = np.eye(4, dtype=np.float32)
    swapped = weight[:, [1, 0, 2, 3]]
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["logits"]),
                        helper.make_node("Identity", ["attention_mask"], ["M"])],
                       [value("X", FLOAT, ["B", "S", 4]), value("attention_mask", INT64, ["B", "S"])],
                       [value("logits", FLOAT, ["B", "S", 4]), value("M", INT64, ["B", "S"])], [tensor("W", weight)])
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.initializer[0].CopyFrom(tensor("W", swapped))
    x = np.array([[[0, 0, 5, 1], [5, 1, 0, 0]]], np.float32)  # position 1 changes its argmax, and it is padding
    feed = {"X": x, "attention_mask": np.array([[1, 0]], np.int64)}
    (logits, _) = verify(model, other, [feed], repeats=1).outputs
    assert logits.top1_agreement == 1.0 and logits.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert logits.max_abs_error == 0.0 and logits.cosine == pytest.approx(1.0)
    (logits, _) = verify(model, other, [{**feed, "attention_mask": np.ones((1, 2), np.int64)}], repeats=1).outputs
    assert logits.top1_agreement == 0.5


def test_sizes_include_external_data(paths: tuple[Path, Path], tmp_path: Path, weight: np.ndarray) -> None:
    original, compressed = paths
    external = tmp_path / "external.onnx"
    onnx.save(matmul_model(weight), external, save_as_external_data=True, location="external.onnx.data",
              size_threshold=0)
    report = verify(external, compressed, samples=2, repeats=1)
    assert report.original_file_bytes == external.stat().st_size + (tmp_path / "external.onnx.data").stat().st_size
    assert report.compressed_file_bytes == compressed.stat().st_size
    assert report.ratio == pytest.approx(report.original_file_bytes / report.compressed_file_bytes)
    assert report.original_latency_ms > 0 and report.compressed_latency_ms > 0


def text_model() -> onnx.ModelProto:
    table = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("Cast", ["token_type_ids"], ["typef"], to=FLOAT),
        helper.make_node("Unsqueeze", ["typef", "axes"], ["type3"]),
        helper.make_node("Add", ["masked", "type3"], ["Y"]),
    ]
    inputs = [value(name, INT64, ["batch", "sequence"]) for name in ("input_ids", "attention_mask", "token_type_ids")]
    return make_model(nodes, inputs, [value("Y", FLOAT, ["batch", "sequence", 8])],
                      [tensor("E", table), tensor("axes", np.array([2], dtype=np.int64))])


def test_synthetic_inputs_look_like_tokens() -> None:
    feeds = synthetic_feeds(text_model(), 3, seed=4)
    assert len(feeds) == 3
    first = feeds[0]
    assert first["input_ids"].shape == first["attention_mask"].shape == (1, 16)
    assert first["input_ids"].dtype == np.int64 and 0 <= first["input_ids"].min() <= first["input_ids"].max() < 100
    assert len(np.unique(np.concatenate([f["input_ids"] for f in feeds]))) > 10
    assert (first["attention_mask"] == 1).all() and (first["token_type_ids"] == 0).all()
    again = synthetic_feeds(text_model(), 3, seed=4)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(feeds, again, strict=True))
    report = verify(text_model(), text_model(), samples=3, repeats=1)
    assert report.outputs[0].max_abs_error == 0.0 and report.outputs[0].shape == (3, 16, 8)
    assert report.latency_input_shapes == {"input_ids": [1, 16], "attention_mask": [1, 16],
                                           "token_type_ids": [1, 16]}


def test_models_with_different_inputs_are_refused(weight: np.ndarray) -> None:
    half = matmul_model(weight.astype(np.float16))
    with pytest.raises(ModelError, match=r"inputs differ: original \(X: float32\), compressed \(X: float16\)"):
        verify(matmul_model(weight), half)


def test_bad_data_is_a_calibration_error(weight: np.ndarray) -> None:
    with pytest.raises(CalibrationError, match="input 'X' has dtype float64, the model expects float32"):
        verify(matmul_model(weight), matmul_model(weight), {"X": np.zeros((2, 32))})


# ---------------------------------------------------------------------------------------------------------- CLI


def invoke(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_json_parses(paths: tuple[Path, Path], tmp_path: Path) -> None:
    original, compressed = paths
    np.savez(tmp_path / "data.npz", X=np.random.default_rng(1).standard_normal((9, 32)).astype(np.float32))
    code, stdout, _ = invoke("verify", original, compressed, "--data", tmp_path / "data.npz", "--samples", 5,
                             "--repeats", 1, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["samples"] == 5 and report["providers"] == ["CPUExecutionProvider"]
    assert report["compressed_file_bytes"] == compressed.stat().st_size
    assert report["outputs"][0]["name"] == "Y" and 0 < report["outputs"][0]["cosine"] < 1


def test_cli_table(paths: tuple[Path, Path]) -> None:
    code, stdout, _ = invoke("verify", *paths, "--samples", 2, "--repeats", 1)
    assert code == 0
    assert stdout.splitlines()[0].split()[:3] == ["output", "kind", "shape"]
    assert "smaller" in stdout and "2 samples in 1 run (synthetic, seed 0)" in stdout


def test_cli_bad_input_exits_2_with_one_line(paths: tuple[Path, Path], tmp_path: Path) -> None:
    original, compressed = paths
    np.savez(tmp_path / "bad.npz", X=np.zeros((3, 32)))
    cases = [
        (["verify", tmp_path / "missing.onnx", compressed], "does not exist"),
        (["verify", original, compressed, "--data", tmp_path / "bad.npz"], "has dtype float64"),
        (["verify", original, compressed, "--data", tmp_path / "none.npz"], "does not exist"),
    ]
    for args, message in cases:
        code, _, stderr = invoke(*args)
        assert code == 2, args
        assert message in stderr and len(stderr.strip().splitlines()) == 1


def test_cli_cuda_without_provider_exits_2(paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    code, _, stderr = invoke("verify", *paths, "--device", "cuda")
    assert code == 2
    assert "no CUDAExecutionProvider" in stderr and len(stderr.strip().splitlines()) == 1


def test_compress_checks_calibration_before_any_work(paths: tuple[Path, Path], tmp_path: Path) -> None:
    original, _ = paths
    np.savez(tmp_path / "bad.npz", X=np.zeros((3, 31), np.float32))
    code, _, stderr = invoke("compress", original, "-o", tmp_path / "o.onnx", "--calibration", tmp_path / "bad.npz")
    assert code == 2 and "input 'X' has shape [3, 31]" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_compress_passes_sampled_calibration_data(paths: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    original, _ = paths
    seen: dict[str, object] = {}

    def fake_compress(model: object, config: object, calibration: object = None, **_: object) -> None:
        seen["calibration"] = calibration
        raise JlcmError("stop here")

    monkeypatch.setattr(cli, "compress", fake_compress)
    np.savez(tmp_path / "data.npz", X=np.ones((300, 32), np.float32))
    code, _, _ = invoke("compress", original, "-o", tmp_path / "o.onnx", "--calibration", tmp_path / "data.npz")
    assert code == 2 and isinstance(seen["calibration"], CalibrationData) and len(seen["calibration"]) == 128
    invoke("compress", original, "-o", tmp_path / "o.onnx", "--calibration", tmp_path / "data.npz",
           "--calibration-samples", 7)
    assert len(seen["calibration"]) == 7
    invoke("compress", original, "-o", tmp_path / "o.onnx")
    assert seen["calibration"] is None
