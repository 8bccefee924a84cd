"""Vector codebooks (``vector_dim``): one code per d consecutive inputs of a row, decoded by a Gather of codewords."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig, ConfigError
from jlcm_onnx.cli import main
from jlcm_onnx.encodings.codebook import encode_matrix, equal_group_sizes
from jlcm_onnx.encodings.error_feedback import damped_gram
from jlcm_onnx.encodings.vector_format import vector_groups
from jlcm_onnx.encodings.vector_learning import learn_vectors, nearest_output_codes, vector_objective

from conftest import (
    FLOAT,
    INT64,
    check_full,
    correlated_inputs,
    make_model,
    matmul_model,
    model_hash,
    run,
    tensor,
    value,
)

F16 = np.dtype(np.float16)


def paired_weights(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Weights whose neighbouring inputs move together (w[2j + 1] = 0.9 w[2j] + noise): what a scalar codebook,
    one coordinate at a time, cannot exploit."""
    first = rng.standard_normal((rows, cols // 2))
    second = 0.9 * first + 0.3 * rng.standard_normal((rows, cols // 2))
    return np.stack([first, second], axis=2).reshape(rows, cols).astype(np.float32)


@pytest.mark.parametrize("layout", ["matmul", "gemm", "conv", "gather"])
@pytest.mark.parametrize(("dim", "bits", "block"), [(2, 3, None), (4, 2, 16), (8, 1, None)])
def test_onnxruntime_decodes_exactly_the_encoding(layout: str, dim: int, bits: int, block: int | None) -> None:
    """Every reader's decoder (column codes of MatMul's B [in, out], row codes of a Gemm's B^T and a Conv, the row
    decoder of an embedding table) gives EncodedMatrix.decode() in onnxruntime, with outliers and uneven groups."""
    rng = np.random.default_rng(dim)
    matrix = rng.standard_normal((48, 64)).astype(np.float32)  # [rows, cols]
    config = CompressionConfig(bits=bits, vector_dim=dim, groups=5, block_size=block, min_elements=64,
                               outlier_fraction=0.01, reorder=False)
    if layout == "matmul":
        model, feeds = matmul_model(matrix.T.copy()), {"X": np.eye(64, dtype=np.float32)}
    elif layout == "gemm":
        model = make_model([helper.make_node("Gemm", ["X", "W"], ["Y"], transB=1)], [value("X", FLOAT, ["N", 64])],
                           [value("Y", FLOAT, ["N", 48])], [tensor("W", matrix)])
        feeds = {"X": np.eye(64, dtype=np.float32)}
    elif layout == "conv":  # W [48, 4, 4, 4]: rows are the output channels
        model = make_model([helper.make_node("Conv", ["X", "W"], ["Y"])], [value("X", FLOAT, [1, 4, 4, 4])],
                           [value("Y", FLOAT, [1, 48, 1, 1])], [tensor("W", matrix.reshape(48, 4, 4, 4))])
        feeds = {"X": rng.standard_normal((1, 4, 4, 4)).astype(np.float32)}
    else:
        model = make_model([helper.make_node("Gather", ["W", "ids"], ["Y"])], [value("ids", INT64, [3, 2])],
                           [value("Y", FLOAT, [3, 2, 64])], [tensor("W", matrix)])
        feeds = {"ids": np.array([[0, 47], [5, 5], [30, 12]])}
    result = jlcm_onnx.compress(model, config)
    check_full(result.model)
    (record,) = result.report.compressed
    assert record.encoding.startswith(f"vector codebook of {dim}") and record.bits == bits
    outliers = 0.0 if layout == "gather" else 0.01  # a table read by its row decoder keeps none
    expected = encode_matrix(matrix, bits, equal_group_sizes(48, 5), F16, outlier_fraction=outliers,
                             block_size=block, vector_dim=dim).decode()
    (decoded,) = run(result.model, feeds)
    if layout == "matmul":
        decoded = decoded.T
    elif layout == "gemm":
        decoded = decoded.T
    elif layout == "conv":
        decoded = decoded.reshape(48)
        expected = expected.reshape(48, 4, 4, 4).reshape(48, -1) @ feeds["X"].reshape(-1)
    else:
        expected = expected[feeds["ids"]]
    np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-5)


def test_vectors_beat_scalar_codebooks_at_equal_bytes_on_correlated_weights() -> None:
    """3 bits per weight either way: per-row scalar codebooks (8 values a row) against one codebook of 64 pairs per
    16 rows, which costs fewer bytes and follows the pairs' joint spread (measured: 0.026 against 0.034)."""
    matrix = paired_weights(np.random.default_rng(0), 128, 256)
    scalar = encode_matrix(matrix, 3, equal_group_sizes(128, None), F16)
    vector = encode_matrix(matrix, 3, equal_group_sizes(128, 8), F16, vector_dim=2)
    assert vector.codebooks.nbytes <= scalar.codebooks.nbytes and vector.codes.size * 6 == scalar.codes.size * 3

    def error(encoded: object) -> float:
        return float(np.sum((encoded.decode() - matrix) ** 2) / np.sum(matrix**2))

    assert error(vector) < 0.85 * error(scalar)


def test_learning_lowers_the_output_error_and_never_raises_it() -> None:
    weight = np.random.default_rng(4).standard_normal((64, 96)).astype(np.float32)
    inputs = correlated_inputs(512, 96, seed=5).astype(np.float64)
    gram = inputs.T @ inputs
    for block in (None, 32):
        initial = encode_matrix(weight, 3, equal_group_sizes(64, 2), F16, vector_dim=2, block_size=block,
                                outlier_fraction=0.01)
        learned, objective = learn_vectors(weight, initial, gram)
        assert objective == pytest.approx(vector_objective(weight, learned, damped_gram(gram, 96)))
        assert learned.codebooks.dtype == F16 and learned.codes.shape == (64, 48)
        assert objective < 0.7 * vector_objective(weight, initial, damped_gram(gram, 96))


def test_the_normalised_nearest_codeword_is_the_one_of_least_output_error() -> None:
    """The assignment searches the group codebooks in the normalised space of each vector's block; it must pick what
    the full cost ``|(w - (s c + m)) A|^2`` over every row's candidates picks, outliers (patched, costed in full)
    included."""
    rng = np.random.default_rng(13)
    rows, entries, dim = 40, 16, 2
    books = torch.from_numpy(rng.standard_normal((3, entries, dim)))
    groups = torch.from_numpy(np.repeat(np.arange(3), [10, 20, 10]))
    values = torch.from_numpy(rng.standard_normal((rows, dim)))
    inverse = torch.linalg.inv(torch.from_numpy(np.triu(rng.uniform(0.5, 1.5, (dim, dim)))))
    scale, offset = torch.from_numpy(rng.uniform(0.1, 2.0, rows)), torch.from_numpy(rng.normal(size=rows))
    exact = torch.zeros(rows, dim, dtype=torch.bool)
    exact[[3, 17], [0, 1]] = True
    stored = torch.from_numpy(rng.standard_normal((rows, dim)))
    quantized, chosen = nearest_output_codes(values, books, groups, inverse, scale, offset, exact, stored)
    candidates = torch.where(exact[:, None], stored[:, None], books[groups] * scale[:, None, None]
                             + offset[:, None, None])
    full = ((values[:, None] - candidates) @ inverse).square().sum(dim=2)
    assert torch.equal(chosen, full.argmin(dim=1))
    torch.testing.assert_close(quantized, candidates[torch.arange(rows), chosen])


def test_calibrated_vectors_lower_the_model_output_error() -> None:
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((96, 64)).astype(np.float32)
    model = matmul_model(weight)
    inputs = correlated_inputs(256, 96, seed=7)
    config = CompressionConfig(bits=2, vector_dim=2, min_elements=64)
    data_free = jlcm_onnx.compress(model, config)
    calibrated = jlcm_onnx.compress(model, config, calibration=[{"X": inputs[:128]}])
    assert "learned" in calibrated.report.compressed[0].encoding
    held_out = inputs[128:]
    (reference,) = run(model, {"X": held_out})
    errors = [float(np.sum((run(r.model, {"X": held_out})[0] - reference) ** 2)) for r in (data_free, calibrated)]
    assert errors[1] < 0.5 * errors[0]


def test_default_groups_keep_codebooks_to_an_eighth_of_a_bit_per_weight() -> None:
    assert vector_groups(576, 1536, 3, 2) == 576 * 1536 // (128 * 64 * 2)
    assert vector_groups(8, 8, 4, 2) == 1
    weight = np.random.default_rng(8).standard_normal((256, 512)).astype(np.float32)
    result = jlcm_onnx.compress(matmul_model(weight), CompressionConfig(bits=3, vector_dim=2))
    (record,) = result.report.compressed
    assert record.groups == vector_groups(512, 256, 3, 2)
    assert record.compressed_bytes * 8 / weight.size < 3 + 1 / 8 + 0.2  # codes, codebooks, outliers and maps


def test_inspect_counts_the_values_of_vector_codebooks(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "vectors.onnx"
    weight = np.random.default_rng(12).standard_normal((64, 64)).astype(np.float32)
    jlcm_onnx.compress(matmul_model(weight), CompressionConfig(bits=3, vector_dim=2, groups=2)).save(path)
    outcome = CliRunner().invoke(main, ["inspect", str(path)])
    assert outcome.exit_code == 0
    (line,) = [line for line in outcome.output.splitlines() if line.startswith("W ")]
    assert line.split()[5:10] == ["vector", "codebook", "of", "2", "2"] and line.split()[10] == str(2 * 64 * 2)


def test_a_weight_whose_rows_do_not_split_into_vectors_keeps_scalar_codebooks() -> None:
    weight = np.random.default_rng(9).standard_normal((63, 40)).astype(np.float32)  # rows of 63 inputs
    result = jlcm_onnx.compress(matmul_model(weight), CompressionConfig(bits=3, vector_dim=2, min_elements=64))
    assert result.report.compressed[0].encoding == "multi-codebook"


def test_the_size_planner_plans_vector_codebooks_within_their_bits() -> None:
    rng = np.random.default_rng(10)
    model = make_model([helper.make_node("MatMul", ["X", "A"], ["H"]), helper.make_node("MatMul", ["H", "B"], ["Y"])],
                       [value("X", FLOAT, ["N", 128])], [value("Y", FLOAT, ["N", 128])],
                       [tensor("A", rng.standard_normal((128, 256)).astype(np.float32)),
                        tensor("B", rng.standard_normal((256, 128)).astype(np.float32))])
    result = jlcm_onnx.compress(model, CompressionConfig(vector_dim=4, target_bits_per_weight=2.5))
    assert all(r.bits <= 2 and r.encoding.startswith("vector codebook of 4") for r in result.report.compressed)
    bits = 8 * sum(r.compressed_bytes for r in result.report.compressed) / (2 * 128 * 256)
    assert bits == pytest.approx(2.5, rel=0.05)


def test_the_same_inputs_give_the_same_bytes() -> None:
    weight = paired_weights(np.random.default_rng(11), 64, 128)
    config = CompressionConfig(bits=3, vector_dim=2, block_size=32, min_elements=64)
    hashes = {model_hash(jlcm_onnx.compress(matmul_model(weight), config).model) for _ in range(2)}
    assert len(hashes) == 1


@pytest.mark.parametrize(("settings", "words"), [
    ({"bits": 3, "vector_dim": 4}, "at most 2 with 3 bits"),
    ({"bits": 4, "vector_dim": 2, "speed": "fast"}, "speed 'fast'"),
    ({"vector_dim": 2, "encoding": "multi-scaling"}, "multi-scaling"),
    ({"vector_dim": 9}, "1..8"),
    ({"bits": 2, "vector_dim": 4, "block_size": 6}, "divisor of block_size 6"),
])
def test_bad_vector_settings_are_refused(settings: dict, words: str) -> None:
    with pytest.raises(ConfigError, match="vector_dim") as error:
        CompressionConfig(**settings)
    assert words in str(error.value)


def test_the_cli_refuses_too_many_bits_per_vector_in_one_line(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "model.onnx"
    path.write_bytes(matmul_model(np.ones((64, 64), np.float32)).SerializeToString())
    outcome = CliRunner().invoke(main, ["compress", str(path), "-o", str(tmp_path / "out.onnx"), "--bits", "3",
                                        "--vector-dim", "4"])
    assert outcome.exit_code != 0 and "vector_dim" in outcome.output and "Traceback" not in outcome.output
    assert not (tmp_path / "out.onnx").exists()
