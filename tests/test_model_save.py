"""Large outputs are written and checked a tensor at a time, with external data, without a serialized copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from jlcm_onnx.ir import lazy_weights, model_save
from jlcm_onnx.ir.model_load import load_model
from jlcm_onnx.ir.output_check import check_output, reference_for

from conftest import make_model, run, tensor, value


def two_matmuls(rng: np.random.Generator) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])],
        [value("x", TensorProto.FLOAT, ["n", 64])], [value("y", TensorProto.FLOAT, ["n", 16])],
        [tensor("a", rng.standard_normal((64, 128)).astype(np.float32)),
         tensor("b", rng.standard_normal((128, 16)).astype(np.float32)), tensor("small", np.ones(4, np.float32))])


def test_external_data_is_written_a_tensor_at_a_time_aligned_and_loads(rng: np.random.Generator, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy_weights, "LAZY_MIN_BYTES", 1024)
    monkeypatch.setattr(model_save, "ALIGN_MIN_BYTES", 16 << 10)
    source = tmp_path / "in.onnx"
    original = two_matmuls(rng)
    onnx.save(original, source)
    model = load_model(source)[0]  # both weights lazy: copied file to file
    model.graph.initializer[1].CopyFrom(tensor("b", np.full((128, 16), 0.5, np.float32)))  # one in memory
    before = model.SerializeToString()
    model_save.write_with_external_data(model, tmp_path / "out.onnx")
    assert model.SerializeToString() == before
    written = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in written.graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    assert sorted(external) == ["a", "b"]
    assert int(external["a"]["offset"]) % model_save.EXTERNAL_ALIGNMENT == 0  # 32 KB: aligned (threshold lowered)
    assert int(external["b"]["offset"]) == int(external["a"]["offset"]) + 64 * 128 * 4  # 8 KB: packed right after
    assert {info["location"] for info in external.values()} == {"out.onnx.data"}
    feed = {"x": rng.standard_normal((3, 64)).astype(np.float32)}
    lazy_weights.materialize(model)
    np.testing.assert_array_equal(ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, feed)[0],
                                  run(model, feed)[0])


def test_a_large_output_is_checked_from_a_file_not_a_serialized_copy(rng: np.random.Generator,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = two_matmuls(rng)
    reference = reference_for(model)
    monkeypatch.setattr(model_save, "LOADABLE_INLINE_BYTES", 1024)
    loaded = []
    with model_save.loadable(model) as what:
        loaded.append(what)
    assert isinstance(loaded[0], str) and not Path(loaded[0]).exists()  # a file, removed after use
    assert check_output(model, reference) is None
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.initializer[0].raw_data = broken.graph.initializer[0].raw_data[:-4]  # one float short
    with pytest.raises(RuntimeError, match="fails its checks"):
        check_output(broken, reference)


def test_serialized_bytes_is_exact_below_the_limit_and_a_bound_above_it_without_encoding_the_model(
        rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """protobuf cannot encode a message past 2 GB even to measure it (``ByteSize`` raises), so above the limit the size
    is bounded from the parts."""
    model = two_matmuls(rng)
    exact = model.ByteSize()
    assert model_save.serialized_bytes(model) == exact
    monkeypatch.setattr(model_save, "INLINE_LIMIT_BYTES", 1000)
    measure = onnx.ModelProto.ByteSize
    monkeypatch.setattr(onnx.ModelProto, "ByteSize", lambda self: pytest.fail("the weights were encoded") if len(
        self.graph.initializer) else measure(self))  # the structure alone may be measured
    bound = model_save.serialized_bytes(model)
    assert exact <= bound <= exact + 3 * (model_save.TENSOR_HEADER_BYTES + 64)
