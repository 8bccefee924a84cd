"""Batched weighted 1-D k-means (kmeans.py) and the multi-codebook encoding built on it (codebook.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jlcm_onnx.encodings.codebook import codebook_errors, encode_matrix, equal_group_sizes
from jlcm_onnx.encodings.kmeans import fit_codebooks
from jlcm_onnx.encodings.sqnr import sqnr_db

#: SQNR (dB) of the Lloyd-Max scalar quantizer of a unit Gaussian with 2**b levels.
LLOYD_MAX_GAUSSIAN_DB = {1: 4.40, 2: 9.30, 3: 14.62, 4: 20.22}


def decode(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.take_along_axis(values.astype(np.float64), codes.astype(np.intp), axis=1)


@pytest.fixture(scope="module")
def gaussian_groups() -> np.ndarray:
    return np.random.default_rng(2024).standard_normal((4, 100_000))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("codebook_dtype", [np.float32, np.float16])
def test_gaussian_reaches_lloyd_max(gaussian_groups: np.ndarray, bits: int, codebook_dtype: type) -> None:
    fitted = fit_codebooks(gaussian_groups, bits, np.dtype(codebook_dtype))
    assert fitted.values.shape == (4, 1 << bits) and fitted.values.dtype == codebook_dtype
    assert fitted.codes.shape == gaussian_groups.shape and fitted.codes.dtype == np.uint8
    decoded = decode(fitted.values, fitted.codes)
    for group in range(4):
        sqnr = sqnr_db(gaussian_groups[group], decoded[group])
        assert abs(sqnr - LLOYD_MAX_GAUSSIAN_DB[bits]) < 0.5, (group, sqnr)


def test_scale_does_not_change_sqnr(gaussian_groups: np.ndarray) -> None:
    """Each group gets its own codebook: scaling one group by 1000 changes nothing in its SQNR."""
    scaled = gaussian_groups[:2] * np.array([[1.0], [1000.0]])
    fitted = fit_codebooks(scaled, 3, np.dtype(np.float32))
    decoded = decode(fitted.values, fitted.codes)
    assert abs(sqnr_db(scaled[0], decoded[0]) - sqnr_db(scaled[1], decoded[1])) < 0.3


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebooks_sorted_and_codes_nearest(gaussian_groups: np.ndarray, bits: int) -> None:
    values = gaussian_groups[:, :5000]
    fitted = fit_codebooks(values, bits, np.dtype(np.float16))
    assert np.all(np.diff(fitted.values.astype(np.float64), axis=1) >= 0)
    assert int(fitted.codes.max()) < 1 << bits
    codebook = fitted.values.astype(np.float64)
    error = np.abs(values - decode(fitted.values, fitted.codes))
    best = np.min(np.abs(values[:, :, None] - codebook[:, None, :]), axis=2)
    np.testing.assert_allclose(error, best, rtol=0, atol=1e-12)  # nearest codeword of the stored (rounded) codebook


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_few_distinct_values_are_exact(bits: int) -> None:
    rng = np.random.default_rng(bits)
    levels = 1 << bits
    groups = []
    for distinct in (1, 2, levels // 2 or 1, levels):  # fewer distinct values than codewords, and exactly as many
        pool = np.unique(rng.standard_normal(4 * levels + 8).astype(np.float16)).astype(np.float64)
        choice = rng.choice(pool, size=distinct, replace=False)
        groups.append(choice[rng.integers(0, distinct, size=600)])
    values = np.stack(groups)
    for dtype in (np.float16, np.float32):
        fitted = fit_codebooks(values, bits, np.dtype(dtype))
        np.testing.assert_array_equal(decode(fitted.values, fitted.codes), values)


def test_exact_values_with_float32_codebook() -> None:
    """Values that are not float16 numbers are still exact with a float32 codebook."""
    values = np.array([[0.1, 0.2, 0.1, 0.30000001, 0.2, 0.1, 0.4] * 10], dtype=np.float32).astype(np.float64)
    fitted = fit_codebooks(values, 2, np.dtype(np.float32))
    np.testing.assert_array_equal(decode(fitted.values, fitted.codes), values.astype(np.float32))
    assert math.isinf(sqnr_db(values, decode(fitted.values, fitted.codes).astype(np.float32)))


def test_constant_group() -> None:
    values = np.full((2, 100), 0.375)
    values[1] = -2.0
    fitted = fit_codebooks(values, 3, np.dtype(np.float16))
    np.testing.assert_array_equal(decode(fitted.values, fitted.codes), values)


def test_importance_pulls_codeword() -> None:
    """A heavily weighted value pulls the nearest codeword towards itself (weighted k-means)."""
    values = np.linspace(0.0, 1.0, 1001)[None, :]
    target = 950
    plain = fit_codebooks(values, 1, np.dtype(np.float32)).values[0]
    importance = np.ones_like(values)
    importance[0, target] = 2000.0
    weighted = fit_codebooks(values, 1, np.dtype(np.float32), importance=importance).values[0]
    assert abs(plain[1] - 0.75) < 0.01  # the two codewords of a uniform [0, 1] are 1/4 and 3/4
    assert abs(weighted[1] - values[0, target]) < abs(plain[1] - values[0, target]) - 0.1
    assert weighted[1] > 0.85


def test_importance_scale_invariant_and_uniform_matches_plain() -> None:
    rng = np.random.default_rng(5)
    values = rng.standard_normal((3, 2000))
    plain = fit_codebooks(values, 3, np.dtype(np.float32))
    uniform = fit_codebooks(values, 3, np.dtype(np.float32), importance=np.full_like(values, 7.0))
    np.testing.assert_allclose(uniform.values, plain.values, rtol=1e-6, atol=1e-7)
    importance = rng.random(values.shape) + 0.1
    first = fit_codebooks(values, 3, np.dtype(np.float32), importance=importance)
    second = fit_codebooks(values, 3, np.dtype(np.float32), importance=importance * 100.0)
    np.testing.assert_allclose(first.values, second.values, rtol=1e-5, atol=1e-6)


def test_importance_through_encode_matrix() -> None:
    values = np.tile(np.linspace(-1.0, 1.0, 201), (4, 1)).astype(np.float32)
    importance = np.ones_like(values)
    importance[:2, 200] = 1000.0  # rows 0-1 (group 0) care about +1.0
    encoded = encode_matrix(values, 1, (2, 2), np.dtype(np.float32), importance=importance)
    assert encoded.codebooks[0, 1] > encoded.codebooks[1, 1] + 0.2
    assert encoded.codebooks[0, 1] > 0.8


def test_deterministic(gaussian_groups: np.ndarray) -> None:
    values = gaussian_groups[:, :20_000]
    first = fit_codebooks(values, 4, np.dtype(np.float16))
    second = fit_codebooks(values.copy(), 4, np.dtype(np.float16))
    assert first.values.tobytes() == second.values.tobytes()
    assert first.codes.tobytes() == second.codes.tobytes()


def test_batch_does_not_change_a_group(gaussian_groups: np.ndarray) -> None:
    """A group's codebook does not depend on which other groups share its batch."""
    values = gaussian_groups[:, :20_000]
    batched = fit_codebooks(values, 3, np.dtype(np.float32))
    for group in range(values.shape[0]):
        alone = fit_codebooks(values[group:group + 1], 3, np.dtype(np.float32))
        np.testing.assert_array_equal(alone.values[0], batched.values[group])
        np.testing.assert_array_equal(alone.codes[0], batched.codes[group])


def test_more_iterations_never_hurt(gaussian_groups: np.ndarray) -> None:
    values = gaussian_groups[:1, :20_000]
    sqnrs = []
    for iterations in (1, 3, 10, 100):
        fitted = fit_codebooks(values, 3, np.dtype(np.float32), max_iterations=iterations)
        sqnrs.append(sqnr_db(values, decode(fitted.values, fitted.codes)))
    assert all(later >= earlier - 1e-9 for earlier, later in zip(sqnrs, sqnrs[1:], strict=False)), sqnrs


# --------------------------------------------------------------------------------------------------- codebook.py


@pytest.mark.parametrize(
    ("rows", "groups", "expected"),
    [(10, None, (1,) * 10), (10, 1, (10,)), (10, 3, (4, 3, 3)), (9, 3, (3, 3, 3)), (2, 5, (1, 1))],
)
def test_equal_group_sizes(rows: int, groups: int | None, expected: tuple[int, ...]) -> None:
    assert equal_group_sizes(rows, groups) == expected


@pytest.mark.parametrize("group_sizes", [(4, 3, 3), (10,), (1,) * 10, (5, 5)])
def test_encode_matrix_groups(group_sizes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(group_sizes))
    matrix = rng.standard_normal((10, 300)).astype(np.float32)
    encoded = encode_matrix(matrix, 3, group_sizes, np.dtype(np.float16))
    assert encoded.bits == 3
    assert encoded.codebooks.shape == (len(group_sizes), 8) and encoded.codebooks.dtype == np.float16
    assert encoded.codes.shape == matrix.shape
    row_books = encoded.row_codebooks()
    start = 0
    for group, size in enumerate(group_sizes):  # all rows of a group share its codebook...
        shared = np.repeat(encoded.codebooks[group:group + 1], size, axis=0)
        np.testing.assert_array_equal(row_books[start:start + size], shared)
        # ...and the group's codebook is the k-means of the group's values alone
        alone = fit_codebooks(matrix[start:start + size].reshape(1, -1).astype(np.float64), 3, np.dtype(np.float16))
        np.testing.assert_array_equal(alone.values[0], encoded.codebooks[group])
        start += size
    assert 8.0 < sqnr_db(matrix, encoded.decode()) < 20.0


@pytest.mark.parametrize("outlier_fraction", [0.0, 0.01])
@pytest.mark.parametrize("group_sizes", [(40, 30, 30, 28), (128,), (3, 125)])
def test_codebook_errors_match_the_encoding(group_sizes: tuple[int, ...], outlier_fraction: float) -> None:
    """The error read off the sorted groups is the error of what encode_matrix writes, at every bit width."""
    matrix = (np.random.default_rng(7).standard_t(4, size=(128, 96)) * 0.02).astype(np.float32)
    errors = codebook_errors(matrix, range(1, 9), group_sizes, np.dtype(np.float16), 25, outlier_fraction)
    for bits in range(1, 9):
        encoded = encode_matrix(matrix, bits, group_sizes, np.dtype(np.float16), max_iterations=25,
                                outlier_fraction=outlier_fraction)
        measured = float(np.sum((encoded.decode().astype(np.float64) - matrix) ** 2))
        assert errors[bits] == pytest.approx(measured, rel=1e-9, abs=1e-12)


def test_encode_matrix_rejects_bad_groups() -> None:
    with pytest.raises(ValueError):
        encode_matrix(np.zeros((4, 4), dtype=np.float32), 2, (2, 1), np.dtype(np.float16))


def test_sqnr_db() -> None:
    reference = np.array([3.0, 4.0])
    assert math.isinf(sqnr_db(reference, reference))
    assert sqnr_db(reference, reference * 0.9) == pytest.approx(20.0)
