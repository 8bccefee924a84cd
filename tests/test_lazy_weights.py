"""Large weights stay in their file until read (``jlcm_onnx.ir.lazy_weights``): the same values and the same bytes as a
full load, for embedded and external data, and a load whose memory does not grow with the file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import jlcm_onnx
from jlcm_onnx.errors import ModelError
from jlcm_onnx.ir.lazy_weights import LAZY_MIN_BYTES, is_lazy, materialize, tensor_array
from jlcm_onnx.ir.model_load import load_model
from jlcm_onnx.ir.model_skeleton import session_with_weights
from tests.conftest import make_model, tensor, value


def two_matmuls(rng: np.random.Generator, rows: int = 256) -> onnx.ModelProto:
    """Y = (X @ W1) @ W2 + B: W1, W2 large (lazy), B small (read at once)."""
    w1 = rng.normal(size=(rows, rows)).astype(np.float32)
    w2 = rng.normal(size=(rows, 64)).astype(np.float32)
    bias = rng.normal(size=(64,)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["X", "W1"], ["H"]), helper.make_node("MatMul", ["H", "W2"], ["P"]),
         helper.make_node("Add", ["P", "B"], ["Y"])],
        [value("X", TensorProto.FLOAT, ["N", rows])], [value("Y", TensorProto.FLOAT, ["N", 64])],
        [tensor("W1", w1), tensor("W2", w2), tensor("B", bias)],
    )


def test_embedded_weights_stay_in_the_file_and_read_back_exactly(tmp_path: Path, rng: np.random.Generator) -> None:
    original = two_matmuls(rng)
    path = tmp_path / "model.onnx"
    onnx.save(original, str(path))
    model, size = load_model(path)
    assert size == path.stat().st_size
    lazy = {t.name for t in model.graph.initializer if is_lazy(t)}
    assert lazy == {"W1", "W2"}
    assert model.ByteSize() < LAZY_MIN_BYTES  # the structure only
    for stored in original.graph.initializer:
        loaded = next(t for t in model.graph.initializer if t.name == stored.name)
        np.testing.assert_array_equal(tensor_array(loaded), numpy_helper.to_array(stored))
    materialize(model)
    assert model.SerializeToString() == path.read_bytes()  # byte for byte the file again


def test_external_data_is_mapped_from_its_own_file(tmp_path: Path, rng: np.random.Generator) -> None:
    original = two_matmuls(rng)
    expected = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    path = tmp_path / "model.onnx"
    onnx.save(original, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data",
              size_threshold=0)
    model, _ = load_model(path)
    arrays = {t.name: tensor_array(t) for t in model.graph.initializer}
    assert {t.name for t in model.graph.initializer if is_lazy(t)} == {"W1", "W2"}
    assert all(isinstance(arrays[name], np.memmap) and not arrays[name].flags.writeable for name in ("W1", "W2"))
    for name, array in expected.items():
        np.testing.assert_array_equal(arrays[name], array)


def test_truncated_external_data_is_a_model_error(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(two_matmuls(rng), str(path), save_as_external_data=True, location="w.data", size_threshold=0)
    data = tmp_path / "w.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot read external data.*W1"):
        load_model(path)


def test_tensors_the_reader_leaves_to_the_parser_stay_inline(tmp_path: Path) -> None:
    """Typed fields (float_data), types numpy lacks (bfloat16) and small tensors are read at once."""
    typed = helper.make_tensor("T", TensorProto.FLOAT, [128, 256], np.ones(128 * 256, np.float32).tolist())
    brain = helper.make_tensor("BF", TensorProto.BFLOAT16, [256, 256], np.zeros(256 * 256, np.uint16).tobytes(),
                               raw=True)
    model = make_model(
        [helper.make_node("MatMul", ["X", "T"], ["Y"]), helper.make_node("Cast", ["BF"], ["Z"], to=TensorProto.FLOAT)],
        [value("X", TensorProto.FLOAT, ["N", 128])],
        [value("Y", TensorProto.FLOAT, ["N", 256]), value("Z", TensorProto.FLOAT, [256, 256])], [typed, brain],
    )
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    loaded, _ = load_model(path)
    assert not any(is_lazy(t) for t in loaded.graph.initializer)
    assert loaded.SerializeToString() == path.read_bytes()


def test_a_truncated_file_is_a_model_error(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(two_matmuls(rng), str(path))
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(ModelError, match="is not a readable ONNX model"):
        load_model(path)


def test_a_file_and_its_proto_compress_to_the_same_bytes(tmp_path: Path, rng: np.random.Generator) -> None:
    original = two_matmuls(rng)
    path = tmp_path / "model.onnx"
    onnx.save(original, str(path))
    config = jlcm_onnx.CompressionConfig(bits=3)
    from_file = jlcm_onnx.compress(path, config, progress=False).model
    from_proto = jlcm_onnx.compress(original, config, progress=False).model
    assert not any(is_lazy(t) for t in from_file.graph.initializer)
    assert from_file.SerializeToString() == from_proto.SerializeToString()


def test_a_calibrated_reordered_run_reads_the_file_as_the_proto(tmp_path: Path, rng: np.random.Generator) -> None:
    """Calibration sessions over a model whose weights are partly in their file (lazy) and partly rewritten in
    memory (the permuted consumer of a re-ordered weight) compute what they compute from the proto."""
    original = two_matmuls(rng)
    path = tmp_path / "model.onnx"
    onnx.save(original, str(path))
    data = [{"X": rng.normal(size=(16, 256)).astype(np.float32)} for _ in range(4)]
    config = jlcm_onnx.CompressionConfig(bits=3, groups=8, reorder=True, learning_steps=5)
    from_file = jlcm_onnx.compress(path, config, calibration=data, progress=False)
    from_proto = jlcm_onnx.compress(original, config, calibration=data, progress=False)
    records = {record.name: record for record in from_file.report.tensors}
    assert records["W1"].row_order.startswith("re-ordered, folded")  # so W2 was permuted in memory
    assert from_file.model.SerializeToString() == from_proto.model.SerializeToString()


def test_a_session_for_some_activations_leaves_out_what_they_do_not_need(tmp_path: Path,
                                                                        rng: np.random.Generator) -> None:
    """Asked for H = X @ W1 only, the session neither runs the second MatMul nor receives W2 (onnxruntime would
    compute every node otherwise)."""
    model, _ = load_model(_saved(two_matmuls(rng), tmp_path))
    for stored in model.graph.initializer:  # in memory, so the weights handed over are counted
        if is_lazy(stored):
            stored.CopyFrom(numpy_helper.from_array(np.asarray(tensor_array(stored)), stored.name))
    session, arrays = session_with_weights(model, ort.SessionOptions(), ["CPUExecutionProvider"],
                                           [helper.make_tensor_value_info("H", TensorProto.FLOAT, None)])
    assert [o.name for o in session.get_outputs()] == ["H"]
    assert [a.shape for a in arrays] == [(256, 256)]  # W1 only
    x = rng.normal(size=(3, 256)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"X": x})[0], x @ arrays[0], rtol=1e-5, atol=1e-4)


def _saved(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_loading_holds_the_structure_not_the_weights(tmp_path: Path) -> None:
    """Peak memory of a lazy load grows with the structure, not with the 96 MB of weights (an eager load holds the
    file's bytes and the parsed message at once: about twice the file)."""
    weights = [tensor(f"W{i}", np.full((1024, 8192), i, np.float32)) for i in range(3)]
    model = make_model(
        [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"]) for i in range(3)],
        [value("X", TensorProto.FLOAT, ["N", 1024])],
        [value(f"Y{i}", TensorProto.FLOAT, ["N", 8192]) for i in range(3)], weights,
    )
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    del model, weights
    script = textwrap.dedent(f"""
        import resource
        from jlcm_onnx.ir.model_load import load_model
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model, _ = load_model({str(path)!r})
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown < 0.25 * path.stat().st_size, grown
