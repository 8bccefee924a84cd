"""Joint learning of codebooks and mappings (jlcm_onnx.encodings.learning) on small synthetic layers with correlated
inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from jlcm_onnx.encodings.codebook import EncodedMatrix, encode_matrix, equal_group_sizes
from jlcm_onnx.encodings.error_feedback import error_feedback_codes
from jlcm_onnx.encodings.learning import layer_objective, learn_layer, refit_codebooks
from jlcm_onnx.encodings.multi_scaling import encode_scaled_matrix

ROWS, COLS, BITS, GROUPS = 64, 48, 3, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These layers are tiny: intra-op threads only add spin-waits (70 s instead of 6 s on a loaded 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def correlated_layer(seed: int, outlier_fraction: float = 0.0):
    """W [64, 48], activations X = A Z [48, 512] with a random mixing A of decaying column scales (H far from Id),
    and W's k-means encoding (3 bits, 4 row groups)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    mixing = rng.standard_normal((COLS, COLS)) * 0.5 ** np.arange(COLS)[None, :] + 0.3 * rng.standard_normal((COLS, 1))
    activations = mixing @ rng.standard_normal((COLS, 512))
    initial = encode_matrix(weight, BITS, equal_group_sizes(ROWS, GROUPS), np.float16,
                            outlier_fraction=outlier_fraction)
    return weight, activations, activations @ activations.T, initial


def output_error(weight: np.ndarray, encoded: EncodedMatrix, activations: np.ndarray) -> float:
    return float(np.linalg.norm((weight.astype(np.float64) - encoded.decode()) @ activations))


@pytest.fixture(scope="module")
def runs() -> dict[tuple[int, str], object]:
    """learn_layer results for seeds 0-2 and every mapping, from the k-means codes (default steps)."""
    results = {}
    for seed in range(3):
        weight, activations, gram, initial = correlated_layer(seed)
        for mapping in ("proximal", "naive", "frozen"):
            results[seed, mapping] = learn_layer(weight, initial, gram, mapping=mapping, init="kmeans")
    return results


def test_the_objective_decreases_and_learning_beats_kmeans(runs):
    weight, activations, gram, initial = correlated_layer(0)
    learned = runs[0, "proximal"]
    assert learned.trace[0] == pytest.approx(learned.initial_objective)
    assert learned.final_objective < 0.5 * learned.initial_objective
    assert min(learned.trace) == pytest.approx(learned.final_objective)
    assert learned.trace[-1] < learned.trace[0]
    assert layer_objective(weight, learned.encoded, gram) == pytest.approx(learned.final_objective, rel=1e-9)
    assert output_error(weight, learned.encoded, activations) < 0.8 * output_error(weight, initial, activations)


def test_the_result_keeps_the_encoding_layout(runs):
    _, _, _, initial = correlated_layer(0)
    encoded = runs[0, "proximal"].encoded
    assert encoded.codes.dtype == np.uint8 and encoded.codes.shape == initial.codes.shape
    assert encoded.codebooks.dtype == initial.codebooks.dtype and encoded.codebooks.shape == initial.codebooks.shape
    assert encoded.group_sizes == initial.group_sizes
    assert np.all(np.diff(encoded.codebooks.astype(np.float64), axis=1) >= 0)
    assert not np.array_equal(encoded.codes, initial.codes)


@pytest.mark.parametrize("seed", range(3))
def test_proximal_beats_naive(runs, seed):
    assert runs[seed, "proximal"].final_objective < runs[seed, "naive"].final_objective


def test_frozen_never_changes_codes_but_learns_codebooks(runs):
    _, _, _, initial = correlated_layer(0)
    frozen = runs[0, "frozen"]
    # the refit may re-sort a codebook, so compare the decoded codewords rather than the raw indices
    order = np.argsort(initial.codebooks.astype(np.float64), axis=1, kind="stable")
    rank = np.argsort(order, axis=1)
    expected = np.take_along_axis(np.repeat(rank, initial.group_sizes, axis=0), initial.codes.astype(np.intp), axis=1)
    assert np.array_equal(frozen.encoded.codes, expected)
    assert not np.array_equal(frozen.encoded.codebooks, initial.codebooks)
    assert frozen.final_objective < frozen.initial_objective
    assert runs[0, "proximal"].final_objective < frozen.final_objective


def test_error_feedback_init_beats_kmeans_codes():
    weight, activations, gram, initial = correlated_layer(1)
    codes = error_feedback_codes(weight, initial.codebooks, initial.group_sizes, gram)
    gptq = dataclasses.replace(initial, codes=codes)
    assert layer_objective(weight, gptq, gram) < 0.5 * layer_objective(weight, initial, gram)
    assert output_error(weight, gptq, activations) < output_error(weight, initial, activations)
    learned = learn_layer(weight, initial, gram, init="error-feedback", steps=50)
    assert learned.trace[0] < layer_objective(weight, gptq, gram)  # the closed-form refit after GPTQ helps
    assert learned.final_objective <= learned.trace[0]


def test_closed_form_codebook_step_never_increases_the_objective():
    for seed in range(3):
        weight, _, gram, initial = correlated_layer(seed)
        initial = dataclasses.replace(initial, codebooks=initial.codebooks.astype(np.float32))
        before = layer_objective(weight, initial, gram)
        once = refit_codebooks(weight, initial, gram)
        after = layer_objective(weight, once, gram)
        assert after < before
        assert layer_objective(weight, refit_codebooks(weight, once, gram), gram) <= after * (1 + 1e-9)
        # scrambled codes: the refit still only lowers the objective
        scrambled = dataclasses.replace(initial, codes=np.random.default_rng(seed).integers(
            0, 1 << BITS, initial.codes.shape).astype(np.uint8))
        assert layer_objective(weight, refit_codebooks(weight, scrambled, gram), gram) <= layer_objective(
            weight, scrambled, gram)


def test_closed_form_with_identity_gram_is_the_centroid():
    weight, _, _, initial = correlated_layer(2)
    initial = dataclasses.replace(initial, codebooks=initial.codebooks.astype(np.float64))
    refit = refit_codebooks(weight, initial, None)
    rows = np.repeat(np.arange(GROUPS), initial.group_sizes)
    for group in range(GROUPS):
        for code in range(1 << BITS):
            chosen = (rows[:, None] == group) & (refit.codes == code)
            if chosen.any():
                assert refit.codebooks[group, code] == pytest.approx(weight[chosen].astype(np.float64).mean(),
                                                                     rel=1e-5)


def test_outliers_stay_exact():
    weight, activations, gram, initial = correlated_layer(0, outlier_fraction=0.02)
    assert initial.outlier_index.size > 0
    for mapping in ("proximal", "naive"):
        for init in ("kmeans", "error-feedback"):
            learned = learn_layer(weight, initial, gram, mapping=mapping, init=init, steps=30)
            assert np.array_equal(learned.encoded.outlier_index, initial.outlier_index)
            assert np.array_equal(learned.encoded.outlier_values, initial.outlier_values)
            decoded = learned.encoded.decode().reshape(-1)[initial.outlier_index]
            assert np.array_equal(decoded, initial.outlier_values.astype(np.float32))
            assert learned.final_objective < learned.initial_objective


def test_two_runs_give_identical_bytes():
    weight, _, gram, initial = correlated_layer(0)
    first = learn_layer(weight, initial, gram, steps=60, init="error-feedback")
    second = learn_layer(weight, initial, gram, steps=60, init="error-feedback")
    assert first.encoded.codes.tobytes() == second.encoded.codes.tobytes()
    assert first.encoded.codebooks.tobytes() == second.encoded.codebooks.tobytes()
    assert first.trace == second.trace


def test_grouped_conv_grams_and_plain_mse():
    weight, _, gram, initial = correlated_layer(1)
    per_group = np.stack([gram, np.eye(COLS) * np.trace(gram) / COLS])  # conv groups of 32 rows each
    learned = learn_layer(weight, initial, per_group, steps=40)
    assert learned.final_objective < learned.initial_objective
    plain = learn_layer(weight, initial, None, steps=40)
    assert plain.final_objective <= plain.initial_objective


def test_multi_scaling_learns_the_shared_codebook_with_the_group_scales_fixed():
    weight, _, gram, _ = correlated_layer(0)
    initial = encode_scaled_matrix(weight, 3, equal_group_sizes(weight.shape[0], GROUPS), np.dtype(np.float16))
    learned = learn_layer(weight, initial, gram, steps=20)
    encoded = learned.encoded
    assert encoded.multi_scaling and np.array_equal(encoded.scales, initial.scales)
    assert not np.array_equal(encoded.shared_codebook, initial.shared_codebook)
    np.testing.assert_allclose(encoded.codebooks, encoded.scales.astype(np.float32)[:, None]
                               * encoded.shared_codebook.astype(np.float32)[None, :])
    assert learned.final_objective == pytest.approx(layer_objective(weight, encoded, gram), rel=1e-4)
    assert learned.final_objective < 0.7 * learned.initial_objective


def test_bad_options_are_refused():
    weight, _, gram, initial = correlated_layer(0)
    with pytest.raises(ValueError, match="mapping"):
        learn_layer(weight, initial, gram, mapping="greedy")
