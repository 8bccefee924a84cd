"""``speed="fast"``: affine blocks written as standard DequantizeLinear, fused by onnxruntime into MatMulNBits.

One model holds every consumer kind (MatMul, Gemm with and without transB, Conv, ConvTranspose, an embedding Gather),
each on its own input, so a single compression exercises every decoder layout.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.encodings.affine_blocks import fit_affine_blocks, learn_affine_blocks
from jlcm_onnx.encodings.affine_decoder import pack_sub_byte
from jlcm_onnx.encodings.learning import layer_objective
from jlcm_onnx.errors import ConfigError
from jlcm_onnx.passes import upgrade_opset
from jlcm_onnx.passes.untie_heads import UntieHeads
from jlcm_onnx.passes.upgrade_opset import UpgradeOpset

from conftest import FLOAT, INT64, all_nodes, correlated_inputs, make_model, tensor, value

#: name -> (shape, row axis) of the weights of :func:`every_consumer_model`.
WEIGHTS = {
    "mm": ((64, 48), 1), "gemm_t": ((40, 64), 0), "gemm": ((64, 40), 1), "conv": ((16, 8, 3, 3), 0),
    "deconv": ((8, 12, 3, 3), 1), "table": ((100, 32), 0),
}
FUSED = ("mm", "gemm_t", "gemm")


def every_consumer_model(rng: np.random.Generator) -> onnx.ModelProto:
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in WEIGHTS.items()}
    nodes = [
        helper.make_node("MatMul", ["x", "mm"], ["y_mm"], name="matmul"),
        helper.make_node("Gemm", ["x", "gemm_t"], ["y_gemm_t"], transB=1, name="gemm_t"),
        helper.make_node("Gemm", ["x", "gemm"], ["y_gemm"], name="gemm"),
        helper.make_node("Conv", ["image", "conv"], ["y_conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("ConvTranspose", ["image", "deconv"], ["y_deconv"], name="deconv"),
        helper.make_node("Gather", ["table", "ids"], ["y_table"], name="embed"),
    ]
    inputs = [value("x", FLOAT, ["N", 64]), value("image", FLOAT, [1, 8, 6, 6]), value("ids", INT64, ["N"])]
    outputs = [value("y_mm", FLOAT, ["N", 48]), value("y_gemm_t", FLOAT, ["N", 40]), value("y_gemm", FLOAT, ["N", 40]),
               value("y_conv", FLOAT, [1, 16, 6, 6]), value("y_deconv", FLOAT, [1, 12, 8, 8]),
               value("y_table", FLOAT, ["N", 32])]
    return make_model(nodes, inputs, outputs, [tensor(name, array) for name, array in weights.items()])


def feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((3, 64)).astype(np.float32),
            "image": rng.standard_normal((1, 8, 6, 6)).astype(np.float32), "ids": np.array([0, 99, 7])}


def session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            optimized_path: str | None = None, accuracy_level: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    if accuracy_level is not None:  # onnxruntime's default, 4, quantizes the fused kernels' activations to int8
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def decoded_affine(weight: np.ndarray, row_axis: int, bits: int, float_offsets: bool) -> np.ndarray:
    """What the fast path's decoder must produce for ``weight``: its data-free fit, decoded, in W's layout."""
    moved = np.moveaxis(weight, row_axis, 0)
    matrix = np.ascontiguousarray(moved.reshape(moved.shape[0], -1), np.float32)
    decoded = fit_affine_blocks(matrix, bits, 32, np.dtype(np.float16), float_offsets=float_offsets).decode()
    return np.moveaxis(decoded.reshape(moved.shape), 0, row_axis)


def with_weights(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for initializer in copy.graph.initializer:
        if initializer.name in arrays:
            initializer.CopyFrom(numpy_helper.from_array(arrays[initializer.name], initializer.name))
    return copy


@pytest.fixture(scope="module")
def original() -> onnx.ModelProto:
    return every_consumer_model(np.random.default_rng(0))


#: With float offsets, the weights whose layout carries them: a lone MatMul's, the unpacked ones and the embedding
#: table's (not a Gemm's).
FLOAT_OFFSETS = ("mm", "conv", "deconv", "table")


@pytest.fixture(scope="module", params=[(2, "integer"), (4, "integer"), (8, "integer"), (4, "float")],
                ids=["2-bit", "4-bit", "8-bit", "4-bit-float-offsets"])
def fast(request: pytest.FixtureRequest, original: onnx.ModelProto) -> tuple[int, jlcm_onnx.CompressionResult]:
    bits, offsets = request.param
    config = CompressionConfig(bits=bits, speed="fast", min_elements=256, affine_offsets=offsets)
    return bits, jlcm_onnx.compress(original, config)


def float_offsets(result: jlcm_onnx.CompressionResult, name: str) -> bool:
    return result.report.config["affine_offsets"] == "float" and name in FLOAT_OFFSETS


def test_every_weight_but_the_table_is_in_affine_blocks(fast: tuple[int, jlcm_onnx.CompressionResult]) -> None:
    bits, result = fast
    records = {record.name: record for record in result.report.tensors}
    assert set(records) == set(WEIGHTS)
    for name, record in records.items():
        assert record.status == "compressed" and record.bits == bits
        affine = name != "table" or float_offsets(result, name)  # the table: per-row codebooks or float offsets
        assert record.encoding.startswith("affine blocks of 32") == affine, record
        assert ("float offsets" in record.encoding) == float_offsets(result, name), record
    assert all("MatMulNBits" in records[name].decode_gate for name in FUSED)
    inlined = onnx.inliner.inline_local_functions(result.model)
    elements = [n for n in inlined.graph.node if n.op_type == "GatherElements"]
    assert len(elements) == 1, "only the embedding table's row decoder reads a codebook (or the grid)"
    assert records["table"].decode_gate.startswith("row decoder")
    for name in FUSED:  # b-bit codes, a float16 scale and a b-bit zero point (or a float16 offset) per block
        (rows, cols), axis = WEIGHTS[name]
        blocks = -(-(rows, cols)[1 - axis] // 32) * (rows, cols)[axis]
        per_block = 2 if float_offsets(result, name) else -(-blocks * bits // 8) / blocks
        assert records[name].compressed_bytes == -(-rows * cols * bits // 8) + blocks * per_block + 2 * blocks


def test_decoders_reproduce_the_encoded_weights(fast: tuple[int, jlcm_onnx.CompressionResult],
                                                original: onnx.ModelProto) -> None:
    """Unfused (no graph optimization), the compressed model computes the original with each affine weight replaced
    by its encoding decoded in numpy; the fused kernels give the same outputs within float tolerance at accuracy level
    0 (float activations), and within int8 rounding of the activations at onnxruntime's default level."""
    bits, result = fast
    weights = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    affine = [name for name in WEIGHTS if name != "table" or float_offsets(result, name)]
    expected = with_weights(original, {name: decoded_affine(weights[name], WEIGHTS[name][1], bits,
                                                            float_offsets(result, name)) for name in affine})
    inputs = feeds(np.random.default_rng(1))
    names = [o.name for o in original.graph.output if o.name != "y_table" or "table" in affine]
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = session(result.model, plain).run(names, inputs)
    for name, got, want in zip(names, unfused, session(expected, plain).run(names, inputs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    for name, got, want in zip(names, session(result.model, accuracy_level=0).run(names, inputs), unfused, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()), err_msg=name)
    for name, got, want in zip(names, session(result.model).run(names, inputs), unfused, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * float(np.abs(want).max()), err_msg=name)


def test_onnxruntime_fuses_every_matmul_and_gemm(fast: tuple[int, jlcm_onnx.CompressionResult], tmp_path) -> None:
    _, result = fast
    path = str(tmp_path / "optimized.onnx")
    session(result.model, optimized_path=path)
    optimized = onnx.load(path)
    kinds = [node.op_type for node in optimized.graph.node]
    assert kinds.count("MatMulNBits") == len(FUSED), kinds
    assert "Gemm" not in kinds  # and the only MatMul left is the float offsets' share (1/32 of the layer)
    assert kinds.count("MatMul") == float_offsets(result, "mm"), kinds


def test_the_upgraded_opset_is_recorded_and_the_file_is_deterministic(original: onnx.ModelProto) -> None:
    config = CompressionConfig(bits=4, speed="fast", min_elements=256)
    first, second = (jlcm_onnx.compress(original, config) for _ in range(2))
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert any("opset 17 -> 21" in note for note in first.report.notes)
    assert first.model.ir_version >= 10


def test_opset_upgrade_keeps_outputs() -> None:
    """ReduceMean's and ReduceMax's axes moved from an attribute to an input at opset 18: the converted model must
    agree."""
    rng = np.random.default_rng(2)
    model = make_model(
        [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1),
         helper.make_node("Sub", ["x", "mean"], ["centred"]),
         helper.make_node("ReduceMax", ["centred"], ["b"], axes=[0], keepdims=0),
         helper.make_node("Softmax", ["centred"], ["y"], axis=1)],
        [value("x", FLOAT, [2, 8])], [value("y", FLOAT, [2, 8]), value("b", FLOAT, [8])],
    )
    upgraded = UpgradeOpset(21, 10)(model).model
    onnx.checker.check_model(upgraded, full_check=True)
    x = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    for got, want in zip(session(upgraded).run(None, x), session(model).run(None, x), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_model_the_converter_cannot_upgrade_falls_back_to_codebooks(original: onnx.ModelProto, monkeypatch) -> None:
    """No blocked DequantizeLinear at opset 17: the weights go to codebooks, the report says why, and the file is
    valid at the model's own opset."""
    def refuse(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("No Adapter For Op")

    monkeypatch.setattr(upgrade_opset.version_converter, "convert_version", refuse)
    result = jlcm_onnx.compress(original, CompressionConfig(bits=4, speed="fast", min_elements=256))
    assert any("ai.onnx opset 17 kept" in note and "No Adapter For Op" in note for note in result.report.notes)
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 17
    assert "DequantizeLinear" not in {node.op_type for node in all_nodes(result.model)}
    assert all(r.encoding.startswith("multi-codebook") for r in result.report.compressed)
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("bits", [2, 4])
def test_sub_byte_packing_is_onnx_layout(bits: int) -> None:
    values = np.random.default_rng(3).integers(0, 1 << bits, (7, 5)).astype(np.uint8)
    kind = onnx.TensorProto.UINT4 if bits == 4 else onnx.TensorProto.UINT2
    stored = helper.make_tensor("q", kind, values.shape, pack_sub_byte(values, bits), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.uint8), values)


def test_data_free_fit_beats_min_max_rounding() -> None:
    matrix = np.random.default_rng(4).standard_normal((64, 256)).astype(np.float32)
    fitted = fit_affine_blocks(matrix, 4, 32, np.dtype(np.float32))
    blocks = matrix.reshape(64, 8, 32)
    low, high = np.minimum(blocks.min(2, keepdims=True), 0), np.maximum(blocks.max(2, keepdims=True), 0)
    scale = (high - low) / 15
    zero = np.rint(-low / scale)
    rounded = ((np.clip(np.rint(blocks / scale) + zero, 0, 15) - zero) * scale).reshape(64, 256)
    assert np.sum((fitted.decode() - matrix) ** 2) < 0.97 * np.sum((rounded - matrix) ** 2)


def test_calibrated_fit_lowers_the_layer_error() -> None:
    rng = np.random.default_rng(5)
    matrix = rng.standard_normal((48, 96)).astype(np.float32)
    inputs = correlated_inputs(512, 96, seed=1).astype(np.float64)
    gram = inputs.T @ inputs
    initial = fit_affine_blocks(matrix, 4, 32, np.dtype(np.float16))
    learned, objective = learn_affine_blocks(matrix, initial, gram)
    before = layer_objective(matrix, initial.as_codebook_encoding(), gram)
    assert objective == pytest.approx(layer_objective(matrix, learned.as_codebook_encoding(), gram))
    assert objective < 0.7 * before
    assert learned.scales.dtype == np.float16 and learned.zero_points.max() <= 15


def test_learning_reads_a_read_only_weight_without_a_warning() -> None:
    """Weights memory-mapped from the model file are read-only: torch warned on every calibrated fast conv."""
    matrix = np.random.default_rng(6).standard_normal((16, 64)).astype(np.float32)
    matrix.setflags(write=False)
    gram = correlated_inputs(256, 64, seed=2).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learn_affine_blocks(matrix, fit_affine_blocks(matrix, 4, 32, np.dtype(np.float16)), gram.T @ gram)


@pytest.mark.parametrize("changes, field", [
    ({"bits": 3}, "bits"), ({"block_size": 24}, "block_size"), ({"block_size": 8}, "block_size"),
    ({"bits": 2, "block_size": 16}, "block_size"),
    ({"target_ratio": 6.0}, "target_ratio"), ({"speed": "faster"}, "speed"),
])
def test_fast_settings_onnxruntime_cannot_fuse_are_refused(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        CompressionConfig(**{"speed": "fast", **changes})


def test_block_size_sizes_the_affine_blocks_and_leaves_the_table_without_input_blocks(
        original: onnx.ModelProto) -> None:
    result = jlcm_onnx.compress(original, CompressionConfig(bits=4, speed="fast", block_size=16, min_elements=256))
    records = {record.name: record for record in result.report.tensors}
    assert records["mm"].encoding == "affine blocks of 16"
    assert "input blocks" not in records["table"].encoding
    (mm_scales,) = [t for t in result.model.graph.initializer if t.name.startswith("mm.jlcm_scales")]
    assert list(mm_scales.dims) == [64 // 16, 48]


def gguf_like_weight(rng: np.random.Generator, inputs: int, outputs: int) -> np.ndarray:
    """W [inputs, outputs] on a 4-bit grid with a float16 scale and minimum per block of 32 inputs (GGUF Q4_1)."""
    blocks = (inputs // 32, outputs)
    scales = rng.uniform(0.01, 0.1, blocks).astype(np.float16).astype(np.float32)
    minimums = rng.uniform(-0.8, 0.0, blocks).astype(np.float16).astype(np.float32)
    codes = rng.integers(0, 16, (inputs, outputs))
    return (np.repeat(scales, 32, axis=0) * codes + np.repeat(minimums, 32, axis=0)).astype(np.float32)


def test_float_offsets_reproduce_q4_1_blocks_and_stay_fused(tmp_path) -> None:
    rng = np.random.default_rng(6)
    weight = gguf_like_weight(rng, 128, 64)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="matmul")],
                       [value("X", FLOAT, [2, "T", 128])], [value("Y", FLOAT, [2, "T", 64])], [tensor("W", weight)])
    floats = jlcm_onnx.compress(model, CompressionConfig(speed="fast", affine_offsets="float", min_elements=256))
    integers = jlcm_onnx.compress(model, CompressionConfig(speed="fast", min_elements=256))
    (record,) = floats.report.tensors
    assert record.encoding == "affine blocks of 32, float offsets" and "MatMulNBits" in record.decode_gate
    assert record.sqnr_db > 60 > integers.report.tensors[0].sqnr_db
    x = {"X": rng.standard_normal((2, 5, 128)).astype(np.float32)}
    want = x["X"] @ weight
    unfused = session(floats.model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, x)[0]
    np.testing.assert_allclose(unfused, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
    path = str(tmp_path / "optimized.onnx")
    fused = session(floats.model, optimized_path=path, accuracy_level=0).run(None, x)[0]
    np.testing.assert_allclose(fused, unfused, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert [n.op_type for n in onnx.load(path).graph.node].count("MatMulNBits") == 1


def test_calibrated_float_offsets_lower_the_layer_error() -> None:
    rng = np.random.default_rng(7)
    matrix = rng.standard_normal((48, 96)).astype(np.float32) + 0.5
    inputs = correlated_inputs(512, 96, seed=2).astype(np.float64)
    gram = inputs.T @ inputs
    initial = fit_affine_blocks(matrix, 4, 32, np.dtype(np.float16), float_offsets=True)
    learned, objective = learn_affine_blocks(matrix, initial, gram)
    assert learned.offsets is not None and learned.offsets.dtype == np.float16
    assert objective < 0.7 * layer_objective(matrix, initial.as_codebook_encoding(), gram)


def tied_language_model(rng: np.random.Generator) -> onnx.ModelProto:
    """ids -> Gather(E) -> Tanh -> MatMul(., Transpose(E)): an embedding table tied to the head."""
    table = rng.standard_normal((96, 64)).astype(np.float32)
    return make_model(
        [helper.make_node("Gather", ["E", "ids"], ["embedded"], name="embed"),
         helper.make_node("Tanh", ["embedded"], ["hidden"], name="hidden"),
         helper.make_node("Transpose", ["E"], ["E_t"], perm=[1, 0], name="tie"),
         helper.make_node("MatMul", ["hidden", "E_t"], ["logits"], name="head")],
        [value("ids", INT64, ["N"])], [value("logits", FLOAT, ["N", 96])], [tensor("E", table)])


def test_a_tied_head_gets_its_own_fused_copy(tmp_path) -> None:
    model = tied_language_model(np.random.default_rng(8))
    ids = {"ids": np.array([0, 95, 7, 7])}
    untied = UntieHeads(CompressionConfig(speed="fast", min_elements=256))(copy_of(model))
    assert untied.notes == ["E: tied to the head MatMul:head, stored twice (a copy for each reader)"]
    assert "Transpose" not in {node.op_type for node in untied.model.graph.node}
    np.testing.assert_array_equal(session(untied.model).run(None, ids)[0], session(model).run(None, ids)[0])

    result = jlcm_onnx.compress(model, CompressionConfig(speed="fast", min_elements=256))
    records = {record.name: record for record in result.report.tensors}
    assert records["E"].decode_gate.startswith("row decoder")
    head = records["E.jlcm_head"]
    assert head.encoding == "affine blocks of 32" and "MatMulNBits" in head.decode_gate
    assert untied.notes[0] in result.report.notes
    path = str(tmp_path / "optimized.onnx")
    got = session(result.model, optimized_path=path).run(None, ids)[0]
    assert "MatMulNBits" in {node.op_type for node in onnx.load(path).graph.node}
    want = session(model).run(None, ids)[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    small = jlcm_onnx.compress(model, CompressionConfig(min_elements=256))
    assert [record.name for record in small.report.tensors] == ["E"]


def copy_of(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_decode_at_load_folds_the_weights_onnxruntime_cannot_fuse(original: onnx.ModelProto, tmp_path) -> None:
    config = CompressionConfig(bits=4, speed="fast", decode_at_load=True, min_elements=256)
    result = jlcm_onnx.compress(original, config)
    records = {record.name: record for record in result.report.tensors}
    for name in ("conv", "deconv"):
        assert records[name].encoding == "affine blocks of 32, float offsets"
        assert records[name].decode_gate.startswith("none: decoded once at load")
    path = str(tmp_path / "optimized.onnx")
    inputs = feeds(np.random.default_rng(1))
    folded = session(result.model, optimized_path=path).run(["y_conv", "y_deconv"], inputs)
    kinds = [node.op_type for node in onnx.load(path).graph.node]
    assert kinds.count("DequantizeLinear") == 0 and kinds.count("MatMulNBits") == len(FUSED)
    weights = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    expected = with_weights(original, {name: decoded_affine(weights[name], WEIGHTS[name][1], 4, True)
                                       for name in ("conv", "deconv")})
    for got, want in zip(folded, session(expected).run(["y_conv", "y_deconv"], inputs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
