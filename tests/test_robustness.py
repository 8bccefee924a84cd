"""Bad and unusual inputs (issue 6): each gets a typed error from the API and a one-line message with exit code 2 from
the CLI, or a correct model; the input file's bytes are never changed and no partial output is left behind."""

from __future__ import annotations

import errno
import hashlib
import importlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import jlcm_onnx
import jlcm_onnx.ir.model_load as model_load
import jlcm_onnx.ir.model_save as model_save
from jlcm_onnx import CompressionConfig, ConfigError, JlcmError, ModelError, OutputError
from jlcm_onnx.cli import main
from jlcm_onnx.ir.output_check import reference_for
from jlcm_onnx.ir.synthetic_inputs import declared_inputs, synthetic_feed
from jlcm_onnx.passes.base import Pass, PassResult

from conftest import FLOAT, FLOAT16, INT64, make_model, run, tensor, value

CONFIG = CompressionConfig(bits=3, min_elements=16)
pass_list = importlib.import_module("jlcm_onnx.pipeline.pass_list")
INT8 = TensorProto.INT8


# ---------------------------------------------------------------------------------------------------------- helpers


def mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return make_model(
        [
            helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc1"),
            helper.make_node("Relu", ["H"], ["R"], name="relu"),
            helper.make_node("MatMul", ["R", "W2"], ["Y"], name="fc2"),
        ],
        [value("X", FLOAT, ["N", 32])],
        [value("Y", FLOAT, ["N", 8])],
        [tensor("W1", rng.standard_normal((32, 16)).astype(np.float32)),
         tensor("W2", rng.standard_normal((16, 8)).astype(np.float32))],
    )


def raw_model(nodes, inputs, outputs, initializers=(), opsets=(("", 17),), ir_version=9) -> onnx.ModelProto:
    """A model built without the checker (for inputs that are meant to be invalid or unusual)."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=ir_version)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` (the input model and anything beside it)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def assert_refused(path: Path, tmp_path: Path, error: type[JlcmError], message: str) -> None:
    """The API raises ``error`` (one line matching ``message``), the CLI exits 2 with one line, nothing is written and
    the input folder's bytes are unchanged."""
    before = digest(path.parent)
    with pytest.raises(error, match=message) as raised:
        jlcm_onnx.compress(path, CONFIG)
    assert "\n" not in str(raised.value)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir(exist_ok=True)
    code, _, stderr = cli("compress", path, "-o", out, "--min-elements", 16, "--quiet")
    assert code == 2, stderr
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists() and os.listdir(out.parent) == []
    assert digest(path.parent) == before


def assert_left_alone(path: Path, tmp_path: Path, note: str) -> jlcm_onnx.CompressionResult:
    """Compresses without error, the report's notes say why nothing changed, the output runs in onnxruntime like the
    input; the CLI agrees and the input folder's bytes are unchanged."""
    before = digest(path.parent)
    result = jlcm_onnx.compress(path, CONFIG)
    assert result.report.compressed == []
    assert any(note in n for n in result.report.notes), result.report.notes
    onnx.checker.check_model(result.model, full_check=True)
    original = onnx.load(path)
    feed = synthetic_feed(declared_inputs(original), np.random.default_rng(3))
    for got, want in zip(run(result.model, feed), run(original, feed), strict=True):
        np.testing.assert_array_equal(got, want)
    out = tmp_path / "left-alone.onnx"
    code, _, stderr = cli("compress", path, "-o", out, "--min-elements", 16, "--quiet")
    assert code == 0, stderr
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert digest(path.parent) == before
    return result


# ---------------------------------------------------------------------------------------------------- external data


def external_model(folder: Path, location: str) -> Path:
    """model.onnx in ``folder`` whose W1 is stored at external ``location``; W1's bytes are written there when the
    location is a plain file name inside the folder."""
    model = mlp()
    weight = model.graph.initializer[0]
    data = weight.raw_data
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    weight.external_data.add(key="length", value=str(len(data)))
    folder.mkdir(parents=True, exist_ok=True)
    return save(model, folder)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the model's folder holding valid weight bytes: refusing must not depend on it being garbage."""
    path = tmp_path / "secret.bin"
    path.write_bytes(mlp().graph.initializer[0].raw_data)
    return path


@pytest.fixture
def no_onnx_external_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if onnx is ever asked to read external data: the location must be refused before."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("onnx read external data of a refused model")

    monkeypatch.setattr(model_load.external_data_helper, "load_external_data_for_model", forbidden)


def test_external_data_absolute_location_is_refused(tmp_path, secret, no_onnx_external_read):
    path = external_model(tmp_path / "m", str(secret))
    assert_refused(path, tmp_path, ModelError, f"tensor 'W1' has external data location '{secret}': an absolute path")


def test_external_data_windows_absolute_location_is_refused(tmp_path, no_onnx_external_read):
    path = external_model(tmp_path / "m", "C:\\Windows\\secret.bin")
    assert_refused(path, tmp_path, ModelError, "tensor 'W1' .* an absolute path")


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "..\\secret.bin"])
def test_external_data_dotdot_location_is_refused(tmp_path, secret, no_onnx_external_read, location):
    path = external_model(tmp_path / "m", location)
    (path.parent / "sub").mkdir()
    assert_refused(path, tmp_path, ModelError, "tensor 'W1' has external data location .*'\\.\\.' leads outside")


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path, secret, no_onnx_external_read):
    path = external_model(tmp_path / "m", "weights.bin")
    (path.parent / "weights.bin").symlink_to(secret)
    assert_refused(path, tmp_path, ModelError, "tensor 'W1' has external data location 'weights.bin': it resolves")


def test_external_data_symlinked_folder_out_of_the_model_folder_is_refused(tmp_path, secret, no_onnx_external_read):
    path = external_model(tmp_path / "m", "data/secret.bin")
    (path.parent / "data").symlink_to(tmp_path)
    assert_refused(path, tmp_path, ModelError, "tensor 'W1' .* it resolves \\(through a symbolic link\\) outside")


def test_external_data_inside_a_subfolder_is_read(tmp_path):
    path = external_model(tmp_path / "m", "sub/../weights/w1.bin")
    (path.parent / "sub").mkdir()
    (path.parent / "weights").mkdir()
    (path.parent / "weights" / "w1.bin").write_bytes(mlp().graph.initializer[0].raw_data)
    before = digest(path.parent)
    result = jlcm_onnx.compress(path, CONFIG)
    assert [r.name for r in result.report.compressed] == ["W1", "W2"]
    assert digest(path.parent) == before


def test_model_past_the_protobuf_limit_round_trips_through_external_data(tmp_path, monkeypatch):
    """Past 2 GB (the limit lowered to 4 KB here) the input is read with its external data, checked and run from a
    temporary file, and the output is written as a model file plus one external-data file beside it."""
    monkeypatch.setattr(model_save, "INLINE_LIMIT_BYTES", 4096)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 128)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")], [value("X", FLOAT, ["N", 256])],
                       [value("Y", FLOAT, ["N", 128])], [tensor("W", weight)])
    folder = tmp_path / "big"
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    before = digest(folder)
    result = jlcm_onnx.compress(folder / "model.onnx", CONFIG)
    assert result.report.original_file_bytes > 128 * 1024 and result.model.ByteSize() > 4096
    output = tmp_path / "out" / "small.onnx"
    output.parent.mkdir()
    written = result.save(output)
    assert sorted(p.name for p in output.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    assert written == sum(p.stat().st_size for p in output.parent.iterdir())
    assert digest(folder) == before
    feeds = {"X": rng.standard_normal((4, 256)).astype(np.float32)}
    expected = run(result.model, feeds)[0]
    np.testing.assert_allclose(ort.InferenceSession(str(output)).run(None, feeds)[0], expected, rtol=1e-6, atol=1e-6)


def test_missing_external_data_file(tmp_path):
    path = external_model(tmp_path / "m", "gone.bin")
    assert_refused(path, tmp_path, ModelError, "cannot read external data")


def test_model_proto_with_external_references_is_refused(tmp_path, secret):
    path = external_model(tmp_path / "m", "../secret.bin")
    with pytest.raises(ModelError, match="tensor 'W1' keeps its data in external file '../secret.bin'"):
        jlcm_onnx.compress(onnx.load(path, load_external_data=False), CONFIG)


# ------------------------------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip file", b"\x89PNG\r\n\x1a\n", "ünïcödé".encode()])
def test_not_onnx(tmp_path, content):
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(content)
    assert_refused(path, tmp_path, ModelError, "is empty: not an ONNX model|is not a readable ONNX model")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_protobuf(tmp_path, fraction):
    data = mlp().SerializeToString()
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(data[: int(len(data) * fraction)])
    assert_refused(path, tmp_path, ModelError, "is not a readable ONNX model|is not a valid ONNX model|has no nodes")


def test_empty_graph(tmp_path):
    model = raw_model([], [value("X", FLOAT, [1])], [value("X", FLOAT, [1])])
    assert_refused(save(model, tmp_path / "m"), tmp_path, ModelError, "the model's graph has no nodes")


def test_opset_newer_than_onnxruntime(tmp_path):
    model = mlp()
    model.opset_import[0].version = 40
    assert_refused(save(model, tmp_path / "m"), tmp_path, ModelError, "cannot load the input model: .*Opset 40")


def test_ir_version_newer_than_supported(tmp_path):
    model = mlp()
    model.ir_version = onnx.IR_VERSION + 1
    assert_refused(save(model, tmp_path / "m"), tmp_path, ModelError, "ir_version|IR version")


def test_unknown_custom_domain_is_refused(tmp_path):
    """A node of a domain stock onnxruntime does not know: the input cannot run (no custom-op library is registered),
    so neither could the output: refused up front with onnxruntime's reason."""
    model = mlp()
    model.graph.node[1].op_type, model.graph.node[1].domain = "FancyRelu", "com.example"
    model.opset_import.add(domain="com.example", version=1)
    assert_refused(save(model, tmp_path / "m"), tmp_path, ModelError,
                   "onnxruntime .* cannot load the input model: .*com.example:FancyRelu")


def test_duplicate_node_names_are_refused(tmp_path):
    model = mlp()
    model.graph.node[2].name = "fc1"
    assert_refused(save(model, tmp_path / "m"), tmp_path, ModelError, "two nodes with same node name")


def test_missing_node_names_are_fine(tmp_path):
    model = mlp()
    for node in model.graph.node:
        node.ClearField("name")
    path = save(model, tmp_path / "m")
    before = digest(path.parent)
    result = jlcm_onnx.compress(path, CONFIG)
    assert [r.name for r in result.report.compressed] == ["W1", "W2"]
    names = [n.name for n in result.model.graph.node if n.name]
    assert len(names) == len(set(names))
    assert digest(path.parent) == before


# ---------------------------------------------------------------------------------------------- already quantized


def test_a_model_compressed_by_jlcm_is_refused(tmp_path):
    compressed = jlcm_onnx.compress(mlp(), CONFIG).model
    assert_refused(save(compressed, tmp_path / "m"), tmp_path, JlcmError, "already compressed by jlcm-onnx")


def test_qdq_model_is_left_alone(tmp_path):
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"]),
         helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [value("X", FLOAT, ["N", 32])],
        [value("Y", FLOAT, ["N", 16])],
        [tensor("Wq", rng.integers(-128, 128, (32, 16)).astype(np.int8)), tensor("scale", np.float32(0.02)),
         tensor("zero", np.int8(0))],
    )
    assert_left_alone(save(model, tmp_path / "m"), tmp_path, "already quantized (1 DequantizeLinear)")


def test_qlinear_matmul_model_is_left_alone(tmp_path):
    rng = np.random.default_rng(0)
    scalars = {"xs": np.float32(0.1), "xz": np.int8(0), "ws": np.float32(0.02), "wz": np.int8(0),
               "ys": np.float32(0.5), "yz": np.int8(0)}
    model = make_model(
        [helper.make_node("QLinearMatMul", ["X", "xs", "xz", "Wq", "ws", "wz", "ys", "yz"], ["Y"])],
        [value("X", INT8, ["N", 32])],
        [value("Y", INT8, ["N", 16])],
        [tensor("Wq", rng.integers(-128, 128, (32, 16)).astype(np.int8))]
        + [tensor(name, array) for name, array in scalars.items()],
    )
    assert_left_alone(save(model, tmp_path / "m"), tmp_path, "already quantized (1 QLinearMatMul)")


def test_matmul_nbits_model_is_left_alone(tmp_path):
    rng = np.random.default_rng(0)
    k, n, block = 32, 16, 32
    model = raw_model(
        [helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                          block_size=block)],
        [value("X", FLOAT, ["N", k])],
        [value("Y", FLOAT, ["N", n])],
        [tensor("B", rng.integers(0, 256, (n, k // block, block // 2)).astype(np.uint8)),
         tensor("S", rng.random((n, k // block)).astype(np.float32))],
        opsets=(("", 17), ("com.microsoft", 1)),
    )
    assert_left_alone(save(model, tmp_path / "m"), tmp_path, "already quantized (1 MatMulNBits)")


# -------------------------------------------------------------------------------------------------- float types


def test_float16_weights(tmp_path):
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [value("X", FLOAT16, ["N", 32])],
        [value("Y", FLOAT16, ["N", 16])],
        [tensor("W", rng.standard_normal((32, 16)).astype(np.float16))],
    )
    path = save(model, tmp_path / "m")
    before = digest(path.parent)
    result = jlcm_onnx.compress(path, CONFIG)
    assert [(r.name, r.dtype) for r in result.report.compressed] == [("W", "FLOAT16")]
    x = rng.standard_normal((4, 32)).astype(np.float16)
    (got,), (want,) = run(result.model, {"X": x}), run(model, {"X": x})
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert np.linalg.norm(got - want) < 0.3 * np.linalg.norm(want)  # 3-bit codebooks: close, not equal
    assert result.report.notes == []  # the spot check ran
    assert digest(path.parent) == before


def test_bfloat16_weights(tmp_path):
    """bf16 embedding table read by Gather then Cast (onnxruntime's CPU kernels take bf16 in Gather and Cast)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((40, 16)).astype(np.float32)
    stored = helper.make_tensor("E", TensorProto.BFLOAT16, table.shape, table.ravel().tolist())
    model = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["G"]), helper.make_node("Cast", ["G"], ["Y"], to=FLOAT)],
        [value("ids", INT64, ["N"])],
        [value("Y", FLOAT, ["N", 16])],
        [stored],
    )
    path = save(model, tmp_path / "m")
    before = digest(path.parent)
    result = jlcm_onnx.compress(path, CONFIG)
    assert [(r.name, r.dtype) for r in result.report.compressed] == [("E", "BFLOAT16")]
    ids = np.arange(40, dtype=np.int64)
    (got,), (want,) = run(result.model, {"ids": ids}), run(model, {"ids": ids})
    assert np.linalg.norm(got - want) < 0.3 * np.linalg.norm(want)
    assert digest(path.parent) == before


def test_bfloat16_matmul_without_cpu_kernel_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("W", TensorProto.BFLOAT16, [32, 16], rng.standard_normal(512).tolist())
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [value("X", TensorProto.BFLOAT16, ["N", 32])],
                       [value("Y", TensorProto.BFLOAT16, ["N", 16])], [weight])
    assert_refused(save(model, tmp_path / "m"), tmp_path, ModelError, "cannot load the input model: .*MatMul")


def test_symbolic_and_dynamic_shapes(tmp_path):
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [value("X", FLOAT, ["batch", None, 32])],
        [value("Y", FLOAT, ["batch", None, 16])],
        [tensor("W", rng.standard_normal((32, 16)).astype(np.float32))],
    )
    path = save(model, tmp_path / "m")
    result = jlcm_onnx.compress(path, CONFIG)
    assert result.report.notes == []  # spot check ran on synthetic sizes
    for shape in [(1, 1, 32), (3, 7, 32)]:
        x = rng.standard_normal(shape).astype(np.float32)
        assert run(result.model, {"X": x})[0].shape == (*shape[:2], 16)


# ------------------------------------------------------------------------------------------------------ outputs


def test_output_equal_to_input(tmp_path):
    path = save(mlp(), tmp_path / "m")
    before = digest(path.parent)
    result = jlcm_onnx.compress(path, CONFIG)
    for target in (path, path.parent / "." / path.name, path.parent.parent / "m" / path.name):
        with pytest.raises(OutputError, match="is the input model"):
            result.save(target)
        code, _, stderr = cli("compress", path, "-o", target)
        assert code == 2 and "is the input model" in stderr and len(stderr.strip().splitlines()) == 1
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    with pytest.raises(OutputError, match="is the input model"):
        result.save(link)
    assert digest(path.parent) == before


def test_output_in_missing_folder(tmp_path):
    path = save(mlp(), tmp_path / "m")
    target = tmp_path / "missing" / "o.onnx"
    with pytest.raises(OutputError, match="does not exist"):
        jlcm_onnx.compress(path, CONFIG).save(target)
    code, _, stderr = cli("compress", path, "-o", target)
    assert code == 2 and "does not exist" in stderr and len(stderr.strip().splitlines()) == 1
    assert not target.parent.exists()


def test_output_in_unwritable_folder(tmp_path, monkeypatch):
    """Checked up front (``os.access``, faked: tests may run as root, who can write anywhere)."""
    path = save(mlp(), tmp_path / "m")
    result = jlcm_onnx.compress(path, CONFIG)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(model_save.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(OutputError, match="is not writable"):
        result.save(locked / "o.onnx")
    code, _, stderr = cli("compress", path, "-o", locked / "o.onnx")
    assert code == 2 and "is not writable" in stderr and len(stderr.strip().splitlines()) == 1
    assert os.listdir(locked) == []


def test_permission_denied_while_writing(tmp_path, monkeypatch):
    """A folder that turns out unwritable when the temporary file is made: OutputError, not an internal error."""
    result = jlcm_onnx.compress(mlp(), CONFIG)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(model_save.tempfile, "TemporaryDirectory", denied)
    with pytest.raises(OutputError, match="Permission denied"):
        result.save(tmp_path / "o.onnx")
    assert os.listdir(tmp_path) == []


def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def write_half_then_fail(model: onnx.ModelProto, path: Path) -> None:
        path.write_bytes(model.SerializeToString()[:64])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_save, "_write", write_half_then_fail)


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
    path = save(mlp(), tmp_path / "m")
    before = digest(path.parent)
    result = jlcm_onnx.compress(path, CONFIG)
    out = tmp_path / "out"
    out.mkdir()
    full_disk(monkeypatch)
    with pytest.raises(OutputError, match="No space left on device"):
        result.save(out / "o.onnx")
    code, _, stderr = cli("compress", path, "-o", out / "o.onnx", "--min-elements", 16, "--quiet")
    assert code == 2 and "No space left on device" in stderr and len(stderr.strip().splitlines()) == 1
    assert os.listdir(out) == []
    assert digest(path.parent) == before


# ---------------------------------------------------------------------------------------------- bits and sizes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "0"], "'bits' = 0"),
        (["--bits", "9"], "'bits' = 9"),
        (["--bits", "-3"], "'bits' = -3"),
        (["--groups", "0"], "'groups' = 0"),
        (["--groups", "-1"], "'groups' = -1"),
        (["--min-elements", "-5"], "'min_elements' = -5"),
        (["--outlier-fraction", "0.9"], "'outlier_fraction' = 0.9"),
        (["--outlier-fraction", "-0.1"], "'outlier_fraction'"),
        (["--target-size", "0"], "target_size"),
        (["--target-size", "-10MB"], "target_size"),
        (["--target-size", "lots"], "target_size"),
        (["--target-size", "1TB"], "outside what can be reached"),
        (["--target-size", "10"], "outside what can be reached"),
        (["--ratio", "0"], "target_ratio"),
        (["--ratio", "1000"], "outside what can be reached"),
        (["--bits-per-weight", "0.01"], "outside what can be reached"),
        (["--bits-per-weight", "-1"], "target_bits_per_weight"),
        (["--target-size", "1MB", "--ratio", "4"], "target"),
    ],
)
def test_bits_and_sizes_out_of_range(tmp_path, args, message):
    path = save(mlp(), tmp_path / "m")
    before = digest(path.parent)
    out = tmp_path / "o.onnx"
    code, _, stderr = cli("compress", path, "-o", out, "--min-elements", 16, "--quiet", *args)
    assert code == 2, stderr
    assert message in stderr and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert digest(path.parent) == before


def test_config_errors_from_the_api():
    for fields in ({"bits": 0}, {"bits": 9}, {"groups": 0}, {"min_elements": -1}, {"bits": 2.5}, {"bits": True}):
        with pytest.raises(ConfigError):
            CompressionConfig(**fields)


# -------------------------------------------------------------------------------------------- gate before write


class Corrupt(Pass):
    """Test double for a buggy pass: rewrites the model with ``edit``."""

    def __init__(self, edit: Callable[[onnx.ModelProto], None]) -> None:
        self.edit = edit

    def call(self, model: onnx.ModelProto) -> PassResult:
        self.edit(model)
        return PassResult(model, modified=True)


def with_buggy_pass(monkeypatch: pytest.MonkeyPatch, edit: Callable[[onnx.ModelProto], None]) -> None:
    real = pass_list.build_pipeline
    monkeypatch.setattr(pass_list, "build_pipeline", lambda *a: [*real(*a), Corrupt(edit)])


def poison_output(model: onnx.ModelProto) -> None:
    """Multiplies the output by infinity: it has Inf/NaN where the original's is finite."""
    model.graph.initializer.append(tensor("poison", np.array(np.inf, dtype=np.float32)))
    last = model.graph.node[-1]
    last.output[0] = "Y_finite"
    model.graph.node.append(helper.make_node("Mul", ["Y_finite", "poison"], ["Y"]))


def drop_output_dim(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(tensor("axes0", np.array([1], dtype=np.int64)))
    last = model.graph.node[-1]
    last.output[0] = "Y_full"
    model.graph.node.append(helper.make_node("ReduceSum", ["Y_full", "axes0"], ["Y"], keepdims=1))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "k"  # the declared shape passes the checker


@pytest.mark.parametrize(("edit", "message"), [
    (poison_output, "output 'Y' has NaN or Inf where the original is finite"),
    (drop_output_dim, "output 'Y' is float32\\[1, 1\\], the original's float32\\[1, 8\\]"),
    (lambda model: model.graph.node.pop(), "the compressed model fails its checks"),
])
def test_gate_turns_a_broken_output_into_an_internal_error(tmp_path, monkeypatch, edit, message):
    path = save(mlp(), tmp_path / "m")
    before = digest(path.parent)
    with_buggy_pass(monkeypatch, edit)
    with pytest.raises(RuntimeError, match=message) as raised:
        jlcm_onnx.compress(path, CONFIG)
    assert not isinstance(raised.value, JlcmError)
    out = tmp_path / "o.onnx"
    code, _, stderr = cli("compress", path, "-o", out, "--min-elements", 16, "--quiet")
    assert code == 1 and stderr.startswith("internal error: RuntimeError: ")
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists() and digest(path.parent) == before


def test_spot_check_is_skipped_with_a_note_when_the_original_needs_real_data():
    """An integer input used as a shape: random values cannot run the original, so the spot check is skipped."""
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Reshape", ["H", "shape"], ["Y"])],
        [value("X", FLOAT, ["N", 32]), value("shape", INT64, [2])],
        [value("Y", FLOAT, ["a", "b"])],
        [tensor("W", rng.standard_normal((32, 16)).astype(np.float32))],
    )
    result = jlcm_onnx.compress(model, CONFIG)
    assert [r.name for r in result.report.compressed] == ["W"]
    assert any(n.startswith("spot check skipped: the original model does not run") for n in result.report.notes)


def test_spot_check_token_ids_stay_inside_the_embedding_table():
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["G"]), helper.make_node("MatMul", ["G", "W"], ["Y"])],
        [value("ids", INT64, ["batch", "sequence"])],
        [value("Y", FLOAT, ["batch", "sequence", 8])],
        [tensor("E", rng.standard_normal((6, 16)).astype(np.float32)),
         tensor("W", rng.standard_normal((16, 8)).astype(np.float32))],
    )
    feed = reference_for(model).feed  # the spot check's batch
    assert feed["ids"].shape == (1, 8) and feed["ids"].min() >= 0 and feed["ids"].max() < 6
    result = jlcm_onnx.compress(model, CompressionConfig(min_elements=16))
    assert len(result.report.compressed) == 2 and result.report.notes == []


def test_old_opset_with_nothing_to_compress_is_returned_unchanged():
    """The decoder needs opset 11, but only a model with a weight to compress needs the decoder."""
    model = make_model([helper.make_node("Relu", ["X"], ["Y"])], [value("X", FLOAT, ["N", 4])],
                       [value("Y", FLOAT, ["N", 4])], opset=7)
    result = jlcm_onnx.compress(model, CONFIG)
    assert result.report.tensors == [] and result.report.compressed == []
    assert result.model.graph == model.graph


def test_spot_check_tries_larger_sizes_until_the_original_runs():
    """A Conv with a 33-wide kernel cannot run on 8 samples; the spot check moves on to 64 instead of giving up."""
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Conv", ["X", "W"], ["Y"])],
        [value("X", FLOAT, ["N", 1, "length"])],
        [value("Y", FLOAT, ["N", 4, "out"])],
        [tensor("W", rng.standard_normal((4, 1, 33)).astype(np.float32))],
    )
    result = jlcm_onnx.compress(model, CONFIG)
    assert [r.name for r in result.report.compressed] == ["W"]
    assert result.report.notes == []
