"""Bit-packing of b-bit codes (numpy side) and the ONNX decoder that unpacks them (through ``compress``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.encodings import packing
from jlcm_onnx.encodings.packing import MAX_BITS, WordLayout, pack_codes, unpack_codes

from conftest import check_full, discrete_weight, matmul_model, run

ALL_BITS = list(range(1, MAX_BITS + 1))
LENGTHS = [1, 7, 8, 9, 1001]


def random_codes(bits: int, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 31 * bits + count)
    codes = rng.integers(0, 1 << bits, size=count).astype(np.uint8)
    codes[: min(count, 2)] = [(1 << bits) - 1, 0][: min(count, 2)]  # the all-ones and all-zeros codes
    return codes


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("count", LENGTHS)
def test_round_trip(bits: int, count: int) -> None:
    codes = random_codes(bits, count)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("count", LENGTHS)
def test_packed_size_is_exact(bits: int, count: int) -> None:
    layout = WordLayout(bits)
    packed = pack_codes(random_codes(bits, count), bits)
    assert packed.nbytes == layout.packed_bytes(count)
    assert packed.shape == (layout.bytes_per_word, layout.num_words(count))
    # exactly b bits per code: the only waste is the padding of the last word
    assert layout.codes_per_word * bits % 8 == 0
    assert layout.packed_bytes(count) == math.ceil(count / layout.codes_per_word) * layout.codes_per_word * bits // 8
    assert 0 <= layout.packed_bytes(count) * 8 - count * bits < layout.codes_per_word * bits


@pytest.mark.parametrize("bits", ALL_BITS)
def test_full_words_cost_exactly_b_bits(bits: int) -> None:
    layout = WordLayout(bits)
    count = 40 * layout.codes_per_word
    assert layout.packed_bytes(count) * 8 == count * bits
    assert pack_codes(random_codes(bits, count), bits).nbytes * 8 == count * bits


@pytest.mark.parametrize("bits", ALL_BITS)
def test_every_code_value_round_trips(bits: int) -> None:
    codes = np.arange(1 << bits, dtype=np.uint8)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, bits), bits, codes.size), codes)
    reversed_codes = codes[::-1].copy()
    np.testing.assert_array_equal(unpack_codes(pack_codes(reversed_codes, bits), bits, codes.size), reversed_codes)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_round_trip_per_row(bits: int) -> None:
    """Leading axes are kept: [rows, m] -> [rows, B, N] -> [rows, m]."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(5, 13)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    layout = WordLayout(bits)
    assert packed.shape == (5, layout.bytes_per_word, layout.num_words(13))
    np.testing.assert_array_equal(unpack_codes(packed, bits, 13), codes)
    for row in range(5):  # each row packed on its own gives the same bytes
        np.testing.assert_array_equal(packed[row], pack_codes(codes[row], bits))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_wide_integer_input_types(bits: int) -> None:
    codes = random_codes(bits, 9)
    for dtype in (np.int64, np.int32, np.uint16):
        np.testing.assert_array_equal(pack_codes(codes.astype(dtype), bits), pack_codes(codes, bits))


@pytest.mark.parametrize("bits", ALL_BITS[:-1])
def test_code_too_large_raises(bits: int) -> None:
    codes = np.zeros(9, dtype=np.int64)
    codes[4] = 1 << bits
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(codes, bits)


def test_code_256_does_not_fit_8_bits() -> None:
    with pytest.raises(ValueError):
        pack_codes(np.array([0, 256, 3]), 8)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_negative_code_raises(bits: int) -> None:
    """A negative code does not fit in b bits either; it must not be packed (silently) as a wrapped-around value."""
    with pytest.raises(ValueError):
        pack_codes(np.array([0, -1, 1]), bits)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_layout_rejects_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError):
        WordLayout(bits)


@pytest.mark.parametrize(
    ("bits", "codes_per_word", "bytes_per_word", "word_dtype"),
    [(1, 8, 1, np.uint8), (2, 4, 1, np.uint8), (3, 8, 3, np.uint32), (4, 2, 1, np.uint8),
     (5, 8, 5, np.uint64), (6, 4, 3, np.uint32), (7, 8, 7, np.uint64), (8, 1, 1, np.uint8)],
)
def test_layout_table(bits: int, codes_per_word: int, bytes_per_word: int, word_dtype: type) -> None:
    layout = WordLayout(bits)
    assert layout.codes_per_word == codes_per_word
    assert layout.bytes_per_word == bytes_per_word
    assert layout.word_dtype == np.dtype(word_dtype)


# --------------------------------------------------------------------------------------- the ONNX decoder, end to end


@pytest.mark.parametrize("bits", ALL_BITS)
def test_onnx_decoder_reproduces_codes(bits: int) -> None:
    """Y = I @ W for an identity input is W itself: the decoded weight must equal W bit for bit.

    W [in, out] takes at most 2**b float16 values per output column, every one of them used, so every code value
    (including all-ones) is packed and unpacked by the ONNX graph; n = in * out is not a multiple of the word length.
    """
    rng = np.random.default_rng(100 + bits)
    rows = max(64, 1 << bits) + 3  # odd, so the packed code count needs padding
    weight = discrete_weight((rows, 45), row_axis=1, bits=bits, rng=rng)
    result = jlcm_onnx.compress(matmul_model(weight), CompressionConfig(bits=bits, min_elements=16))
    (record,) = result.report.tensors
    assert record.status == "compressed" and record.bits == bits
    assert math.isinf(record.sqnr_db)
    check_full(result.model)
    (decoded,) = run(result.model, {"X": np.eye(rows, dtype=np.float32)})
    np.testing.assert_array_equal(decoded, weight)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_packing_in_runs_of_words_is_byte_identical(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(3, 1001))
    whole = packing.pack_codes(codes, bits)
    monkeypatch.setattr(packing, "PACK_CHUNK_WORDS", 3)
    assert np.array_equal(packing.pack_codes(codes, bits), whole)
    assert np.array_equal(packing.pack_codes(codes[1], bits), whole[1])
