"""Permuting a weight's output rows and folding the permutation into the graph leaves the model's outputs unchanged
(onnxruntime, relative difference <= 1e-5), and paths that cannot carry the permutation are blocked with a reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from jlcm_onnx.ir.permute_channels import ChannelPath, apply_permutation, find_channel_path
from jlcm_onnx.ir.weight_sites import find_weight_sites

from conftest import FLOAT, INT64, check_full, make_model, run, script, tensor, value

ROOT = Path(__file__).resolve().parents[1]
MINILM = ROOT / "build" / "minilm.onnx"
TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------------------- helpers


def parse(graph_text: str, arrays: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """A model from the ONNX text of one graph, with ``arrays`` as its initializers."""
    model = onnx.parser.parse_model(f'<ir_version: 9, opset_import: ["" : {opset}]>\n{graph_text}')
    model.graph.initializer.extend(tensor(name, array) for name, array in arrays.items())
    check_full(model)
    return model


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def scalar(x: float) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def stored(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(site for site in find_weight_sites(model) if site.name == name).array()


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def non_identity_permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation of ``n`` that is not the identity."""
    while True:
        permutation = rng.permutation(n)
        if not np.array_equal(permutation, np.arange(n)):
            return permutation


def assert_invariant(
    model: onnx.ModelProto, weight: str, row_axis: int, feeds: dict[str, np.ndarray], rng: np.random.Generator,
    permutations: int = 1,
) -> ChannelPath:
    """``weight`` has a channel path; permuting it changes the weight's rows along ``row_axis`` but not the outputs."""
    path = find_channel_path(model, weight)
    assert isinstance(path, ChannelPath), path
    assert path.permuted[0] == (weight, row_axis)
    expected = run(model, feeds)
    original = stored(model, weight)
    for _ in range(permutations):
        permuted = onnx.ModelProto()
        permuted.CopyFrom(model)
        permutation = non_identity_permutation(rng, path.channels)
        apply_permutation(permuted, path, permutation)
        check_full(permuted)
        assert np.array_equal(stored(permuted, weight), np.take(original, permutation, axis=row_axis))
        assert not np.array_equal(stored(permuted, weight), original)
        for actual, reference in zip(run(permuted, feeds), expected, strict=True):
            assert relative_difference(actual, reference) <= TOLERANCE
    return path


def entries(path: ChannelPath) -> dict[str, tuple[int, int]]:
    """name -> (axis, block) of every tensor the path permutes."""
    return {name: (axis, block) for (name, axis), block in zip(path.permuted, path.blocks, strict=True)}


def ffn_model(
    rng: np.random.Generator, activation: str = "R = Relu(A)", scalars: dict[str, float] | None = None
) -> onnx.ModelProto:
    """``MatMul -> Add bias -> activation (A to R, with named scalar constants) -> MatMul``."""
    return parse(
        f"""ffn (float[N, 8] X) => (float[N, 8] Y) {{
            H = MatMul(X, W1)
            A = Add(H, B1)
            {activation}
            Y = MatMul(R, W2)
        }}""",
        {"W1": normal(rng, 8, 16), "B1": normal(rng, 16), "W2": normal(rng, 16, 8)}
        | {name: scalar(x) for name, x in (scalars or {}).items()},
    )


def as_constant_node(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with the initializer ``name`` moved into a ``Constant`` node."""
    initializer = next(t for t in model.graph.initializer if t.name == name)
    model.graph.node.insert(0, helper.make_node("Constant", [], [name], value=initializer))
    model.graph.initializer.remove(initializer)
    check_full(model)
    return model


@pytest.fixture
def x8(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"X": normal(rng, 3, 8)}


@pytest.fixture
def image(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"X": normal(rng, 2, 3, 8, 8)}


# ---------------------------------------------------------------------------------------------------------- paths


def test_matmul_add_relu_matmul(rng, x8):
    path = assert_invariant(ffn_model(rng), "W1", 1, x8, rng)
    assert entries(path) == {"W1": (1, 1), "B1": (0, 1), "W2": (0, 1)}
    assert path.contractions == ("MatMul:Y",)


def test_ffn_many_random_permutations(rng, x8):
    assert_invariant(ffn_model(rng), "W1", 1, x8, rng, permutations=8)


def test_gemm_trans_b_relu_gemm(rng, x8):
    model = parse(
        """gemm (float[N, 8] X) => (float[N, 4] Y) {
            H = Gemm<transB=1>(X, W1, C1)
            R = Relu(H)
            Y = Gemm<transB=0>(R, W2, C2)
        }""",
        {"W1": normal(rng, 16, 8), "C1": normal(rng, 16), "W2": normal(rng, 16, 4), "C2": normal(rng, 4)},
    )
    path = assert_invariant(as_constant_node(model, "W1"), "W1", 0, x8, rng)
    assert entries(path) == {"W1": (0, 1), "C1": (0, 1), "W2": (0, 1)}


def test_erf_gelu_pattern(rng, x8):
    erf_gelu = """D = Div(A, sqrt2)
            E = Erf(D)
            E1 = Add(E, one)
            M = Mul(A, E1)
            R = Mul(M, half)"""
    model = ffn_model(rng, erf_gelu, {"sqrt2": np.sqrt(2), "one": 1, "half": 0.5})
    path = assert_invariant(model, "W1", 1, x8, rng)
    assert set(entries(path)) == {"W1", "B1", "W2"}


def test_tanh_gelu_pattern(rng, x8):
    tanh_gelu = """P = Pow(A, three)
            Q = Mul(P, c)
            S = Add(A, Q)
            T = Mul(S, k)
            U = Tanh(T)
            V = Add(U, one)
            M = Mul(A, V)
            R = Mul(M, half)"""
    model = ffn_model(rng, tanh_gelu, {"three": 3, "c": 0.044715, "k": np.sqrt(2 / np.pi), "one": 1, "half": 0.5})
    path = assert_invariant(model, "W1", 1, x8, rng)
    assert set(entries(path)) == {"W1", "B1", "W2"}


def test_gelu_op(rng, x8):
    model = parse(
        """ffn (float[N, 8] X) => (float[N, 8] Y) {
            H = MatMul(X, W1)
            A = Add(H, B1)
            R = Gelu(A)
            Y = MatMul(R, W2)
        }""",
        {"W1": normal(rng, 8, 16), "B1": normal(rng, 16), "W2": normal(rng, 16, 8)},
        opset=20,
    )
    assert_invariant(model, "W1", 1, x8, rng)


def test_gated_ffn_permutes_both_weights(rng, x8):
    model = parse(
        """glu (float[N, 8] X) => (float[N, 8] Y) {
            U = MatMul(X, Wu)
            G = MatMul(X, Wg)
            S = Sigmoid(G)
            Si = Mul(G, S)
            H = Mul(U, Si)
            Y = MatMul(H, Wd)
        }""",
        {"Wu": normal(rng, 8, 16), "Wg": normal(rng, 8, 16), "Wd": normal(rng, 16, 8)},
    )
    path = assert_invariant(model, "Wu", 1, x8, rng)
    assert entries(path) == {"Wu": (1, 1), "Wg": (1, 1), "Wd": (0, 1)}
    assert_invariant(model, "Wg", 1, x8, rng)


def test_conv_batchnorm_relu_maxpool_conv(rng, image):
    model = parse(
        """cnn (float[N, 3, 8, 8] X) => (float[N, 4, 2, 2] Y) {
            C = Conv<kernel_shape=[3, 3], pads=[1, 1, 1, 1]>(X, W1, B1)
            B = BatchNormalization(C, scale, bias, mean, var)
            R = Relu(B)
            P = MaxPool<kernel_shape=[2, 2], strides=[2, 2]>(R)
            Y = Conv<kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]>(P, W2)
        }""",
        {"W1": normal(rng, 6, 3, 3, 3), "B1": normal(rng, 6), "scale": normal(rng, 6), "bias": normal(rng, 6),
         "mean": normal(rng, 6), "var": rng.uniform(0.5, 2, 6).astype(np.float32), "W2": normal(rng, 4, 6, 3, 3)},
    )
    path = assert_invariant(model, "W1", 0, image, rng)
    assert entries(path) == {
        "W1": (0, 1), "B1": (0, 1), "scale": (0, 1), "bias": (0, 1), "mean": (0, 1), "var": (0, 1), "W2": (1, 1)
    }


def test_conv_depthwise_relu_conv(rng, image):
    model = parse(
        """cnn (float[N, 3, 8, 8] X) => (float[N, 4, 8, 8] Y) {
            C = Conv<kernel_shape=[3, 3], pads=[1, 1, 1, 1]>(X, W1)
            D = Conv<group=6, kernel_shape=[3, 3], pads=[1, 1, 1, 1]>(C, Wd, Bd)
            R = Relu(D)
            Y = Conv<kernel_shape=[1, 1]>(R, W2)
        }""",
        {"W1": normal(rng, 6, 3, 3, 3), "Wd": normal(rng, 6, 1, 3, 3), "Bd": normal(rng, 6),
         "W2": normal(rng, 4, 6, 1, 1)},
    )
    path = assert_invariant(model, "W1", 0, image, rng)
    assert entries(path) == {"W1": (0, 1), "Wd": (0, 1), "Bd": (0, 1), "W2": (1, 1)}


def test_conv_relu_flatten_gemm_permutes_channel_blocks(rng):
    model = parse(
        """cnn (float[N, 3, 4, 4] X) => (float[N, 7] Y) {
            C = Conv<kernel_shape=[3, 3], pads=[1, 1, 1, 1]>(X, W1, B1)
            R = Relu(C)
            F = Flatten<axis=1>(R)
            Y = Gemm<transB=1>(F, W2, C2)
        }""",
        {"W1": normal(rng, 5, 3, 3, 3), "B1": normal(rng, 5), "W2": normal(rng, 7, 80), "C2": normal(rng, 7)},
    )
    path = assert_invariant(model, "W1", 0, {"X": normal(rng, 2, 3, 4, 4)}, rng)
    assert entries(path) == {"W1": (0, 1), "B1": (0, 1), "W2": (1, 16)}


def test_conv_reshape_matmul_permutes_channel_blocks(rng):
    model = parse(
        """cnn (float[N, 3, 4, 4] X) => (float[N, 7] Y) {
            C = Conv<kernel_shape=[3, 3], pads=[1, 1, 1, 1]>(X, W1)
            shape = Constant<value = int64[2] {0, -1}>()
            F = Reshape(C, shape)
            Y = MatMul(F, W2)
        }""",
        {"W1": normal(rng, 5, 3, 3, 3), "W2": normal(rng, 80, 7)},
    )
    path = assert_invariant(model, "W1", 0, {"X": normal(rng, 2, 3, 4, 4)}, rng)
    assert entries(path) == {"W1": (0, 1), "W2": (0, 16)}


def test_conv_global_average_pool_flatten_gemm(rng, image):
    model = parse(
        """cnn (float[N, 3, 8, 8] X) => (float[N, 7] Y) {
            C = Conv<kernel_shape=[3, 3]>(X, W1, B1)
            P = GlobalAveragePool(C)
            F = Flatten(P)
            Y = Gemm(F, W2)
        }""",
        {"W1": normal(rng, 5, 3, 3, 3), "B1": normal(rng, 5), "W2": normal(rng, 5, 7)},
    )
    path = assert_invariant(model, "W1", 0, image, rng)
    assert entries(path) == {"W1": (0, 1), "B1": (0, 1), "W2": (0, 1)}


def test_matmul_layer_norm_matmul(rng, x8):
    model = parse(
        """ln (float[N, 8] X) => (float[N, 8] Y) {
            H = MatMul(X, W1)
            L = LayerNormalization<axis=-1>(H, gamma, beta)
            Y = MatMul(L, W2)
        }""",
        {"W1": normal(rng, 8, 16), "gamma": normal(rng, 16), "beta": normal(rng, 16), "W2": normal(rng, 16, 8)},
    )
    path = assert_invariant(model, "W1", 1, x8, rng)
    assert entries(path) == {"W1": (1, 1), "gamma": (0, 1), "beta": (0, 1), "W2": (0, 1)}


def test_apply_permutation_rejects_a_non_permutation(rng):
    model = ffn_model(rng)
    path = find_channel_path(model, "W1")
    with pytest.raises(ValueError, match="permutation of 16 channels"):
        apply_permutation(model, path, np.zeros(16, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------- blocked


BLOCKED = {
    "residual add": ("R = Add(A, X)\n Y = MatMul(R, W2)", 8, "residual"),
    "concat": ("C = Concat<axis=-1>(A, X)\n Y = MatMul(C, W2)", 16, "Concat"),
    "softmax": ("S = Softmax<axis=-1>(A)\n Y = MatMul(S, W2)", 8, "Softmax"),
    "transpose": ("T = Transpose<perm=[1, 0]>(A)\n Y = Transpose<perm=[1, 0]>(T)", 8, "Transpose"),
    "graph output": ("Y = Relu(A)", 8, "graph output"),
}


@pytest.mark.parametrize("case", sorted(BLOCKED))
def test_blocked_paths_give_a_reason(rng, case):
    nodes, rows, reason = BLOCKED[case]
    model = parse(
        f"""blocked (float[N, 8] X) => (float[N, 8] Y) {{
            H = MatMul(X, W1)
            A = Add(H, B1)
            {nodes}
        }}""",
        {"W1": normal(rng, 8, 8), "B1": normal(rng, 8), "W2": normal(rng, rows, 8)},
    )
    result = find_channel_path(model, "W1")
    assert isinstance(result, str) and reason in result


def test_shared_bias_blocks(rng):
    model = parse(
        """shared (float[N, 8] X) => (float[N, 8] Y, float[N, 16] Z) {
            H = MatMul(X, W1)
            A = Add(H, B)
            R = Relu(A)
            Y = MatMul(R, W2)
            H3 = MatMul(X, W3)
            Z = Add(H3, B)
        }""",
        {"W1": normal(rng, 8, 16), "B": normal(rng, 16), "W2": normal(rng, 16, 8), "W3": normal(rng, 8, 16)},
    )
    result = find_channel_path(model, "W1")
    assert isinstance(result, str) and "B is shared" in result


def test_gather_table_blocks(rng):
    model = parse(
        """embed (int64[N] ids) => (float[N, 4] Y) {
            E = Gather(table, ids)
            Y = MatMul(E, W2)
        }""",
        {"table": normal(rng, 10, 8), "W2": normal(rng, 8, 4)},
    )
    result = find_channel_path(model, "table")
    assert isinstance(result, str) and "Gather" in result


def _if_model(rng: np.random.Generator, branch_reads_relu: bool) -> onnx.ModelProto:
    """``Y = MatMul(Relu(X @ W1), W2)`` and ``Z = If(cond)``, whose branches read R or have their own weight Wt."""
    def branch(name: str) -> onnx.GraphProto:
        if branch_reads_relu:
            return helper.make_graph([helper.make_node("Identity", ["R"], [name])], name, [],
                                     [value(name, FLOAT, ["N", 16])])
        return helper.make_graph([helper.make_node("MatMul", ["X", "Wt"], [name])], name, [],
                                 [value(name, FLOAT, ["N", 16])], [tensor("Wt", normal(rng, 8, 16))])

    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["H"]),
        helper.make_node("Relu", ["H"], ["R"]),
        helper.make_node("MatMul", ["R", "W2"], ["Y"]),
        helper.make_node("If", ["cond"], ["Z"], then_branch=branch("then"), else_branch=branch("else")),
    ]
    return make_model(
        nodes,
        [value("X", FLOAT, ["N", 8]), value("cond", onnx.TensorProto.BOOL, [])],
        [value("Y", FLOAT, ["N", 8]), value("Z", FLOAT, ["N", 16])],
        [tensor("W1", normal(rng, 8, 16)), tensor("W2", normal(rng, 16, 8))],
    )


def test_weight_inside_if_branch_blocks(rng):
    result = find_channel_path(_if_model(rng, branch_reads_relu=False), "Wt")
    assert isinstance(result, str) and "subgraph" in result


def test_tensor_read_inside_a_subgraph_blocks(rng):
    result = find_channel_path(_if_model(rng, branch_reads_relu=True), "W1")
    assert isinstance(result, str) and "subgraph of If" in result


def test_shape_inputs_are_not_permuted(rng):
    """A Reshape's int64 shape input is not data: ``INT64`` constants are left alone."""
    model = parse(
        """reshape (float[N, 8] X) => (float[N, 8] Y) {
            H = MatMul(X, W1)
            F = Reshape(H, shape)
            Y = MatMul(F, W2)
        }""",
        {"W1": normal(rng, 8, 16), "shape": np.array([-1, 16], dtype=np.int64), "W2": normal(rng, 16, 8)},
    )
    assert model.graph.initializer[1].data_type == INT64
    path = assert_invariant(model, "W1", 1, {"X": normal(rng, 3, 8)}, rng)
    assert entries(path) == {"W1": (1, 1), "W2": (0, 1)}


# ---------------------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_feeds() -> dict[str, np.ndarray]:
    if not MINILM.exists():
        pytest.skip(f"{MINILM} not exported (python models/minilm.py export {MINILM})")
    pytest.importorskip("transformers")
    minilm = script("models/minilm.py")
    return minilm.tokenize(["A man is playing a guitar on the stage.", "Permutations leave embeddings unchanged."])


def test_minilm_ffn_paths_and_invariance(minilm_feeds):
    model = onnx.load(MINILM)
    initializers = {t.name for t in model.graph.initializer}
    weights = [node.input[1] for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]
    results = {weight: find_channel_path(model, weight) for weight in weights}
    found = [path for path in results.values() if isinstance(path, ChannelPath)]
    # per layer: Q, K, V blocked at their Reshape into heads, attention output and FFN down at the residual Add
    assert len(weights) == 36 and len(found) == 6
    assert all(path.channels == 1536 and "intermediate.dense.bias" in path.permuted[1][0] for path in found)
    reasons = [result for result in results.values() if isinstance(result, str)]
    assert sum("Reshape" in r for r in reasons) == 18 and sum("residual" in r for r in reasons) == 12

    expected = run(model, minilm_feeds)
    rng = np.random.default_rng(0)
    for path in found:
        apply_permutation(model, path, non_identity_permutation(rng, path.channels))
    actual = run(model, minilm_feeds)
    assert relative_difference(actual[0], expected[0]) <= TOLERANCE
