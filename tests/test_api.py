"""The public API: compress on paths and protos, save, read_metadata, typed errors, determinism."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig, JlcmError, ModelError, OutputError

from conftest import FLOAT, correlated_inputs, make_model, matmul_model, model_hash, run, tensor, value

CONFIG = CompressionConfig(bits=3, min_elements=64)


def two_layer_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((32, 48)).astype(np.float32)
    w2 = rng.standard_normal((24, 48)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    return make_model(
        [
            helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
            helper.make_node("Relu", ["H"], ["R"]),
            helper.make_node("Gemm", ["R", "W2", "b2"], ["Y"], transB=1, name="fc2"),
        ],
        [value("X", FLOAT, ["N", 32])],
        [value("Y", FLOAT, ["N", 24])],
        [tensor("W1", w1), tensor("W2", w2), tensor("b2", bias)],
    )


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(two_layer_model().SerializeToString())
    return path


FEEDS = {"X": np.random.default_rng(9).standard_normal((3, 32)).astype(np.float32)}


# ------------------------------------------------------------------------------------------------------------ inputs


def test_compress_path_and_proto_agree(model_file: Path) -> None:
    from_path = jlcm_onnx.compress(model_file, CONFIG)
    from_str = jlcm_onnx.compress(str(model_file), CONFIG)
    from_proto = jlcm_onnx.compress(onnx.load(model_file), CONFIG)
    assert model_hash(from_path.model) == model_hash(from_proto.model) == model_hash(from_str.model)
    assert from_path.report.original_file_bytes == model_file.stat().st_size
    assert from_path.source == model_file and from_proto.source is None
    assert [r.status for r in from_path.report.tensors] == [r.status for r in from_proto.report.tensors]
    np.testing.assert_array_equal(run(from_path.model, FEEDS)[0], run(from_proto.model, FEEDS)[0])


def test_input_proto_is_not_modified() -> None:
    model = two_layer_model()
    before = model_hash(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    result = jlcm_onnx.compress(model, CONFIG)
    assert model_hash(model) == before
    assert model == copy
    assert len(result.report.compressed) == 2
    assert model_hash(result.model) != before


def test_input_file_is_not_modified(model_file: Path, tmp_path: Path) -> None:
    before = file_hash(model_file)
    result = jlcm_onnx.compress(model_file, CONFIG)
    result.save(tmp_path / "out.onnx")
    assert file_hash(model_file) == before


def test_external_data_input(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save(two_layer_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    assert data.is_file()
    before = (file_hash(path), file_hash(data))
    result = jlcm_onnx.compress(path, CONFIG)
    assert result.report.original_file_bytes == path.stat().st_size + data.stat().st_size
    reference = jlcm_onnx.compress(two_layer_model(), CONFIG).model
    assert list(result.model.graph.node) == list(reference.graph.node)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert stored.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(stored[name], array)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in result.model.graph.initializer)
    assert (file_hash(path), file_hash(data)) == before


# -------------------------------------------------------------------------------------------------------------- save


def test_save_writes_a_loadable_model(model_file: Path, tmp_path: Path) -> None:
    result = jlcm_onnx.compress(model_file, CONFIG)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    written = result.save(out)
    assert written == out.stat().st_size
    assert result.report.compressed_file_bytes == written
    assert sorted(os.listdir(out.parent)) == ["small.onnx"]  # no temporary file left behind
    loaded = onnx.load(out)
    onnx.checker.check_model(loaded, full_check=True)
    assert model_hash(loaded) == model_hash(result.model)
    np.testing.assert_array_equal(run(loaded, FEEDS)[0], run(result.model, FEEDS)[0])


def test_module_level_save(tmp_path: Path) -> None:
    result = jlcm_onnx.compress(two_layer_model(), CONFIG)
    written = jlcm_onnx.save(result, tmp_path / "m.onnx")
    assert written == (tmp_path / "m.onnx").stat().st_size


def test_save_replaces_an_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old contents")
    result = jlcm_onnx.compress(two_layer_model(), CONFIG)
    result.save(out)
    assert out.read_bytes() == result.model.SerializeToString()


def test_save_refuses_to_overwrite_the_input(model_file: Path) -> None:
    before = file_hash(model_file)
    result = jlcm_onnx.compress(model_file, CONFIG)
    with pytest.raises(OutputError):
        result.save(model_file)
    with pytest.raises(OutputError):
        result.save(model_file.parent / "." / model_file.name)  # the same file by another spelling
    assert file_hash(model_file) == before


def test_save_refuses_missing_folder(tmp_path: Path) -> None:
    result = jlcm_onnx.compress(two_layer_model(), CONFIG)
    target = tmp_path / "missing" / "out.onnx"
    with pytest.raises(OutputError):
        result.save(target)
    assert not target.parent.exists()


def test_save_refuses_a_folder(tmp_path: Path) -> None:
    result = jlcm_onnx.compress(two_layer_model(), CONFIG)
    with pytest.raises(OutputError):
        result.save(tmp_path)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half way leaves the previous file as it was and no partial file around."""
    import jlcm_onnx.ir.model_save as model_save

    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    result = jlcm_onnx.compress(two_layer_model(), CONFIG)

    def failing_write(model: onnx.ModelProto, path: Path) -> None:
        path.write_bytes(model.SerializeToString()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_save, "_write", failing_write)
    with pytest.raises(OutputError):
        result.save(out)
    assert out.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


# ---------------------------------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("settings", [{"groups": 4}, {"groups": 1, "block_size": 16}, {"speed": "fast", "bits": 4}],
                         ids=str)
def test_the_memory_budget_changes_no_output_byte(settings: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    config = CompressionConfig(**{"bits": 3, "min_elements": 64, "outlier_fraction": 0.01, **settings})
    default = jlcm_onnx.compress(two_layer_model(), config)
    tiny_chunks = lambda budget, workers: 3 * 48 + 5  # noqa: E731 - a few rows per chunk
    monkeypatch.setattr(importlib.import_module("jlcm_onnx.pipeline.compress"), "chunk_weights", tiny_chunks)
    bounded = jlcm_onnx.compress(two_layer_model(), config.replace(max_memory="3GB"))
    assert bounded.model.SerializeToString() == default.model.SerializeToString()
    assert bounded.report.memory_budget == 3_000_000_000
    assert 0 < bounded.report.peak_rss and "peak memory" in bounded.report.format_table()


def test_read_metadata(tmp_path: Path) -> None:
    config = CompressionConfig(bits=3, groups=4, min_elements=64, exclude=["nothing*"])
    result = jlcm_onnx.compress(two_layer_model(), config)
    out = tmp_path / "m.onnx"
    result.save(out)
    for model in (result.model, onnx.load(out)):
        metadata = jlcm_onnx.read_metadata(model)
        assert metadata is not None
        assert metadata["format_version"] == "3"
        assert metadata["config"] == config.encoding_settings()
        assert CompressionConfig.from_dict(metadata["config"]) == config
        tensors = {t["name"]: t for t in metadata["tensors"]}
        assert set(tensors) == {"W1", "W2"}  # compressed tensors only, not the skipped bias
        assert tensors["W1"]["shape"] == [32, 48] and tensors["W2"]["shape"] == [24, 48]
        for name, entry in tensors.items():
            record = next(r for r in result.report.tensors if r.name == name)
            assert entry["bits"] == 3 and entry["groups"] == 4
            assert entry["dtype"] == "FLOAT"
            assert entry["original_bytes"] == record.original_bytes
            assert entry["compressed_bytes"] == record.compressed_bytes


def test_read_metadata_of_plain_model() -> None:
    assert jlcm_onnx.read_metadata(two_layer_model()) is None


def test_existing_metadata_is_kept() -> None:
    model = two_layer_model()
    model.metadata_props.add(key="author", value="tests")
    result = jlcm_onnx.compress(model, CONFIG)
    props = {p.key: p.value for p in result.model.metadata_props}
    assert props["author"] == "tests"
    again = jlcm_onnx.compress(result.model, CONFIG, force=True)  # replaces, not duplicates, our own keys
    keys = [p.key for p in again.model.metadata_props]
    assert len(keys) == len(set(keys))


def test_a_compressed_input_is_refused_unless_forced() -> None:
    compressed = jlcm_onnx.compress(two_layer_model(), CONFIG).model
    with pytest.raises(JlcmError, match=r"already compressed by jlcm-onnx \(2 tensors encoded.*--force"):
        jlcm_onnx.compress(compressed, CONFIG)
    assert jlcm_onnx.compress(compressed, CONFIG, force=True).report.ratio == pytest.approx(1.0, abs=0.05)


def test_report_json() -> None:
    rng = np.random.default_rng(3)
    levels = np.float16([-1.0, -0.25, 0.5, 2.0]).astype(np.float32)
    weight = levels[rng.integers(0, 4, size=(40, 30))]
    result = jlcm_onnx.compress(matmul_model(weight), CompressionConfig(bits=2, min_elements=64))
    values = json.loads(result.report.to_json())
    (entry,) = values["tensors"]
    assert entry["status"] == "compressed" and entry["exact"] is True and entry["sqnr_db"] is None
    assert values["config"]["bits"] == 2
    assert "exact" in result.report.format_table()


# ------------------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not an onnx model\n", bytes(range(256)) * 4, b'{"graph": {}}', b"\x08\x07\x12\x04test\xff\xff"],
)
def test_non_onnx_file_raises_model_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError):
        jlcm_onnx.compress(path, CONFIG)


def test_missing_file_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        jlcm_onnx.compress(tmp_path / "missing.onnx", CONFIG)
    with pytest.raises(ModelError):
        jlcm_onnx.compress(tmp_path, CONFIG)  # a folder


def test_missing_external_data_raises_model_error(tmp_path: Path) -> None:
    """A model whose external-data file is gone is a bad input (ModelError), not an internal error."""
    path = tmp_path / "ext.onnx"
    onnx.save(two_layer_model(), str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ModelError):
        jlcm_onnx.compress(path, CONFIG)


def test_invalid_model_raises_model_error() -> None:
    model = two_layer_model()
    model.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(ModelError):
        jlcm_onnx.compress(model, CONFIG)


def test_old_opset_raises_model_error() -> None:
    weight = np.ones((16, 8), dtype=np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [value("X", FLOAT, ["N", 16])],
                       [value("Y", FLOAT, ["N", 8])], [tensor("W", weight)], opset=10)
    with pytest.raises(ModelError, match="opset"):
        jlcm_onnx.compress(model, CONFIG)


def test_oldest_supported_opset() -> None:
    weight = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [value("X", FLOAT, ["N", 16])],
                       [value("Y", FLOAT, ["N", 8])], [tensor("W", weight)], opset=11)
    result = jlcm_onnx.compress(model, CompressionConfig(bits=4, min_elements=64))
    assert result.report.tensors[0].status == "compressed"
    onnx.checker.check_model(result.model, full_check=True)


def test_empty_graph_raises_model_error() -> None:
    model = helper.make_model(helper.make_graph([], "empty", [], []), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError):
        jlcm_onnx.compress(model, CONFIG)


@pytest.mark.parametrize("encoding", [{}, {"encoding": "multi-scaling"}, {"block_size": 32}])
def test_calibration_lowers_the_layer_output_error(encoding: dict) -> None:
    """With calibration data the codebooks and codes are learned for the layer's inputs: on held-out inputs of the
    same distribution the output error is lower than data-free k-means at the same size, for every encoding."""
    weight = np.random.default_rng(1).standard_normal((96, 64)).astype(np.float32)
    model = matmul_model(weight)
    config = CompressionConfig(bits=3, groups=4, outlier_fraction=0.0, min_elements=1, **encoding)
    calibration = [{"X": row[None, :]} for row in correlated_inputs(256, 96, seed=2)]
    held_out = {"X": correlated_inputs(512, 96, seed=3)}
    expected = held_out["X"] @ weight
    data_free = jlcm_onnx.compress(model, config)
    learned = jlcm_onnx.compress(model, config, calibration=calibration)
    assert learned.report.compressed[0].compressed_bytes == data_free.report.compressed[0].compressed_bytes
    assert "learned (error-feedback)" in learned.report.compressed[0].encoding
    assert 0 < learned.report.compressed[0].layer_error < 0.05 and data_free.report.compressed[0].layer_error is None

    def error(result: jlcm_onnx.CompressionResult) -> float:
        return float(np.square(run(result.model, held_out)[0] - expected).sum() / np.square(expected).sum())

    assert error(learned) < 0.7 * error(data_free)


def test_bad_calibration_data_is_a_calibration_error() -> None:
    with pytest.raises(jlcm_onnx.CalibrationError, match="Z"):
        jlcm_onnx.compress(two_layer_model(), CONFIG, calibration=[{"Z": FEEDS["X"]}])


def test_errors_are_jlcm_errors() -> None:
    assert issubclass(ModelError, JlcmError) and issubclass(OutputError, JlcmError)
    assert issubclass(jlcm_onnx.ConfigError, JlcmError)


# ------------------------------------------------------------------------------------------------------- determinism


def test_deterministic_output(tmp_path: Path) -> None:
    config = CompressionConfig(bits=3, groups=5, min_elements=64, seed=11)
    first = jlcm_onnx.compress(two_layer_model(), config)
    second = jlcm_onnx.compress(two_layer_model(), config)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    first.save(tmp_path / "a.onnx")
    second.save(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_different_config_gives_different_output() -> None:
    model = two_layer_model()
    three = jlcm_onnx.compress(model, CompressionConfig(bits=3, min_elements=64)).model
    four = jlcm_onnx.compress(model, CompressionConfig(bits=4, min_elements=64)).model
    assert three.SerializeToString() != four.SerializeToString()


def test_model_without_compressible_weights() -> None:
    model = make_model([helper.make_node("Relu", ["X"], ["Y"])], [value("X", FLOAT, ["N", 4])],
                       [value("Y", FLOAT, ["N", 4])])
    result = jlcm_onnx.compress(model, CONFIG)
    assert result.report.tensors == [] and result.report.compressed == []
    x = np.array([[-1.0, 0.0, 2.0, -3.0]], dtype=np.float32)
    np.testing.assert_array_equal(run(result.model, {"X": x})[0], np.maximum(x, 0))


# ------------------------------------------------------------------------------------------------------- runtime


def test_fold_at_load_gives_same_outputs(tmp_path: Path) -> None:
    result = jlcm_onnx.compress(two_layer_model(), CONFIG)
    folded = onnx.ModelProto()
    folded.CopyFrom(result.model)
    assert jlcm_onnx.fold_at_load(folded) >= 1
    onnx.checker.check_model(folded, full_check=True)
    np.testing.assert_allclose(run(folded, FEEDS)[0], run(result.model, FEEDS)[0], rtol=1e-5, atol=1e-5)
    path = tmp_path / "c.onnx"
    result.save(path)
    for keep in (True, False):
        session = jlcm_onnx.inference_session(path, keep_compressed=keep)
        np.testing.assert_allclose(session.run(None, FEEDS)[0], run(result.model, FEEDS)[0], rtol=1e-5, atol=1e-5)


def test_decode_at_load_writes_a_file_onnxruntime_folds_at_load(tmp_path: Path) -> None:
    """Without gates, a plain onnxruntime session decodes every weight at load: its optimized graph holds no decoder
    node and the dense weights, and it computes what the gated file computes."""
    gated = jlcm_onnx.compress(two_layer_model(), CONFIG)
    result = jlcm_onnx.compress(two_layer_model(), CONFIG.replace(decode_at_load=True))
    assert not [n for n in result.model.graph.node if n.op_type == "Size"]
    assert any("decode_at_load" in note for note in result.report.notes)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert not {"GatherElements", "BitShift"} & {node.op_type for node in optimized.graph.node}
    np.testing.assert_allclose(session.run(None, FEEDS)[0], run(gated.model, FEEDS)[0], rtol=1e-5, atol=1e-5)


def test_device_is_checked_before_any_work(monkeypatch) -> None:
    with pytest.raises(jlcm_onnx.ConfigError, match="device"):
        jlcm_onnx.compress(two_layer_model(), CONFIG, device="gpu")
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(JlcmError, match="CUDAExecutionProvider"):
        jlcm_onnx.compress(two_layer_model(), CONFIG, calibration=[FEEDS], device="cuda")
