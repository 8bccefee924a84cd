"""Property-based tests (hypothesis): bit-packing round trips for any bits and shape, exact weights survive the whole
compressor for random bits and shapes, and folding a row permutation into random small MLPs leaves their outputs
unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.encodings.packing import MAX_BITS, WordLayout, pack_codes, unpack_codes
from jlcm_onnx.ir.permute_channels import ChannelPath, apply_permutation, find_channel_path

from conftest import FLOAT, check_full, discrete_weight, expected_groups, make_model, matmul_model, run, tensor, value

#: Derandomized (the same examples every run: no flaky suite) and no example database written into the checkout.
FAST = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=25)

bits_strategy = st.integers(1, MAX_BITS)
seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------------------------------------- packing


@FAST
@given(bits=bits_strategy, lead=st.lists(st.integers(1, 4), max_size=2), count=st.integers(0, 300), seed=seeds)
def test_packing_round_trip(bits: int, lead: list[int], count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=(*lead, count)).astype(np.uint8)
    if codes.size:
        codes.reshape(-1)[0] = (1 << bits) - 1  # the all-ones code always occurs
    packed = pack_codes(codes, bits)
    layout = WordLayout(bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (*lead, layout.bytes_per_word, layout.num_words(count))
    assert packed[..., 0, :].size * layout.bytes_per_word == np.prod(lead, dtype=int) * layout.packed_bytes(count)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


@FAST
@given(bits=bits_strategy, count=st.integers(1, 64), seed=seeds)
def test_packing_is_exactly_b_bits_per_code_for_full_words(bits: int, count: int, seed: int) -> None:
    layout = WordLayout(bits)
    words = count
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=words * layout.codes_per_word)
    assert pack_codes(codes, bits).nbytes * 8 == codes.size * bits


@SLOW
@given(bits=bits_strategy, rows=st.integers(1, 24), cols=st.integers(1, 40), seed=seeds)
def test_weights_with_few_values_survive_compression_exactly(bits: int, rows: int, cols: int, seed: int) -> None:
    """A MatMul weight [cols, rows] whose codebook groups hold at most 2**bits fp16 values decodes exactly, for any
    bits and shape (packing, codebooks and the ONNX decoder together)."""
    rng = np.random.default_rng(seed)
    config = CompressionConfig(bits=bits, min_elements=1, outlier_fraction=0.0, reorder=False)
    groups = expected_groups(rows, cols, config)
    weight = discrete_weight((cols, rows), 1, bits, rng, groups=groups)
    result = jlcm_onnx.compress(matmul_model(weight), config)
    assert [r.bits for r in result.report.compressed] == [bits]
    x = rng.standard_normal((3, cols)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"X": x})[0], x @ weight, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ permutation


ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "Softsign", None)


@st.composite
def mlps(draw: st.DrawFn) -> tuple[onnx.ModelProto, list[str], int]:
    """A random MLP: 2-4 layers of MatMul or Gemm (transB 0/1), optional bias, optional elementwise activation."""
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    widths = draw(st.lists(st.integers(2, 10), min_size=3, max_size=5))
    nodes, initializers, weights = [], [], []
    current = "X"
    for layer, (fan_in, fan_out) in enumerate(zip(widths, widths[1:], strict=False)):
        weight, out = f"W{layer}", f"H{layer}"
        kind = draw(st.sampled_from(("MatMul", "Gemm", "GemmT")))
        bias = draw(st.booleans())
        if kind == "MatMul":
            initializers.append(tensor(weight, rng.standard_normal((fan_in, fan_out)).astype(np.float32)))
            nodes.append(helper.make_node("MatMul", [current, weight], [out]))
            if bias:
                initializers.append(tensor(f"B{layer}", rng.standard_normal(fan_out).astype(np.float32)))
                nodes.append(helper.make_node("Add", [out, f"B{layer}"], [f"{out}b"]))
                out = f"{out}b"
        else:
            shape = (fan_out, fan_in) if kind == "GemmT" else (fan_in, fan_out)
            initializers.append(tensor(weight, rng.standard_normal(shape).astype(np.float32)))
            inputs = [current, weight]
            if bias:
                initializers.append(tensor(f"B{layer}", rng.standard_normal(fan_out).astype(np.float32)))
                inputs.append(f"B{layer}")
            nodes.append(helper.make_node("Gemm", inputs, [out], transB=int(kind == "GemmT")))
        weights.append(weight)
        activation = draw(st.sampled_from(ACTIVATIONS)) if layer < len(widths) - 2 else None
        if activation is not None:
            nodes.append(helper.make_node(activation, [out], [f"{out}a"]))
            out = f"{out}a"
        current = out
    nodes[-1].output[0] = "Y"
    model = make_model(nodes, [value("X", FLOAT, ["N", widths[0]])], [value("Y", FLOAT, ["N", widths[-1]])],
                       initializers)
    return model, weights[:-1], seed  # the last layer's rows are the graph output: not permutable


@SLOW
@given(case=mlps(), data=st.data())
def test_folded_permutation_leaves_random_mlps_unchanged(case, data) -> None:
    model, hidden, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value)).astype(np.float32)
    (expected,) = run(model, {"X": x})
    weight = data.draw(st.sampled_from(hidden))
    path = find_channel_path(model, weight)
    assert isinstance(path, ChannelPath), path  # Add, Gemm bias and elementwise activations carry the permutation
    permutation = np.asarray(data.draw(st.permutations(range(path.channels))))
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    apply_permutation(permuted, path, permutation)
    check_full(permuted)
    (actual,) = run(permuted, {"X": x})
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


@SLOW
@given(case=mlps(), groups=st.integers(2, 4))
def test_reordering_pipeline_matches_the_original_on_random_mlps(case, groups) -> None:
    """The whole compressor at 8 bits with re-ordered groups: outputs stay close to the original's (re-ordering is
    exact, 8-bit codebooks nearly so), whatever the layer types and widths."""
    model, _, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value)).astype(np.float32)
    (expected,) = run(model, {"X": x})
    config = CompressionConfig(bits=8, groups=groups, min_elements=1, codebook_dtype="float32", outlier_fraction=0.0)
    result = jlcm_onnx.compress(model, config)
    (actual,) = run(result.model, {"X": x})
    assert np.linalg.norm(actual - expected) <= 2e-2 * np.linalg.norm(expected) + 1e-5
