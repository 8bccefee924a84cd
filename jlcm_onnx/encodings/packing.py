"""Bit-packing of b-bit codes at exactly b bits per code, in a layout that decodes with scalar shifts.

Codes are packed in *words* of ``L = 8 / gcd(b, 8)`` codes, the smallest run whose bits fill whole bytes, so each word
takes ``B = L * b / 8`` bytes and nothing is wasted (b=3: 8 codes in 3 bytes; b=4: 2 codes in 1 byte). The layout
is *planar*: n codes (padded with zeros to ``L * N`` for ``N`` words) are read as L planes of N consecutive codes, and
word i holds code ``s * N + i`` of plane s in bits ``[s*b, (s+1)*b)``::

    word[i]  = sum_s codes[s * N + i] << (s * b)                   stored little-endian as bytes packed[k, i], k < B
    plane[s] = (word << (W - (s + 1) * b)) >> (W - b)              W = bit width of the word type

Every decode step is an elementwise op between a whole plane and a scalar (fast, vectorised in onnxruntime; a
``[N, 1] x [L]`` broadcast of the same shifts was measured 20x slower), and concatenating the planes gives the codes in
their original order. The formula uses only logical shifts, so it maps onto ONNX ``BitShift`` (opset 11, unsigned
types); the word type is uint8 when ``B == 1``, else uint32 (B <= 4) or uint64 (B <= 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jlcm_onnx.config import MAX_BITS


@dataclass(frozen=True)
class WordLayout:
    """How codes of ``bits`` bits are grouped into little-endian words."""

    bits: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in 1..{MAX_BITS}, got {self.bits}")

    @property
    def codes_per_word(self) -> int:
        return 8 // math.gcd(self.bits, 8)

    @property
    def bytes_per_word(self) -> int:
        return self.codes_per_word * self.bits // 8

    @property
    def word_dtype(self) -> np.dtype:
        """Smallest unsigned type holding one word (uint8, uint32 or uint64)."""
        if self.bytes_per_word == 1:
            return np.dtype(np.uint8)
        return np.dtype(np.uint32 if self.bytes_per_word <= 4 else np.uint64)

    @property
    def word_bit_width(self) -> int:
        return self.word_dtype.itemsize * 8

    def left_shifts(self) -> np.ndarray:
        """``W - (s + 1) * b`` for each slot s: moves code s to the top of the word."""
        slots = np.arange(self.codes_per_word)
        return (self.word_bit_width - (slots + 1) * self.bits).astype(self.word_dtype)

    def right_shift(self) -> int:
        """``W - b``: brings the code at the top of the word down to the low bits."""
        return self.word_bit_width - self.bits

    def num_words(self, num_codes: int) -> int:
        return -(-num_codes // self.codes_per_word)

    def packed_bytes(self, num_codes: int) -> int:
        return self.num_words(num_codes) * self.bytes_per_word


#: Words packed at once by :func:`pack_codes` (bounds its working memory to tens of MB).
PACK_CHUNK_WORDS = 1 << 18


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs integer codes in ``[0, 2**bits)`` along their last axis: [..., m] -> uint8 byte planes [..., B, N], about
    :data:`PACK_CHUNK_WORDS` words (of all leading rows together) at a time: the working words are 8 bytes per code."""
    layout = WordLayout(bits)
    codes = np.asarray(codes)
    lead, count = codes.shape[:-1], codes.shape[-1]
    if codes.size and (int(codes.max()) >= 1 << bits or int(codes.min()) < 0):
        raise ValueError(f"codes range [{int(codes.min())}, {int(codes.max())}] does not fit in {bits} bits")
    words = layout.num_words(count)
    rows = codes.reshape(int(np.prod(lead, dtype=np.int64)), count)
    packed = np.empty((rows.shape[0], layout.bytes_per_word, words), dtype=np.uint8)
    word_step = min(words, PACK_CHUNK_WORDS) or 1
    row_step = max(1, PACK_CHUNK_WORDS // word_step)
    for row in range(0, rows.shape[0], row_step):
        for first in range(0, words, word_step):
            last = min(first + word_step, words)
            packed[row:row + row_step, :, first:last] = _pack_words(rows[row:row + row_step], layout, first, last)
    return packed.reshape(*lead, layout.bytes_per_word, words)


def _pack_words(rows: np.ndarray, layout: WordLayout, first: int, last: int) -> np.ndarray:
    """Words ``[first, last)`` of each row of codes [R, m] as byte planes [R, B, last - first]; word w holds codes w,
    w + N, w + 2N, ... (N words per row)."""
    count, per_word = rows.shape[1], layout.codes_per_word
    words = layout.num_words(count)
    planes = np.zeros((rows.shape[0], per_word, last - first), dtype=np.uint64)
    for slot in range(per_word):
        part = rows[:, min(slot * words + first, count):min(slot * words + last, count)]
        planes[:, slot, :part.shape[1]] = part
    shifts = np.arange(per_word, dtype=np.uint64)[:, None] * np.uint64(layout.bits)
    chunk_words = np.bitwise_or.reduce(planes << shifts, axis=1).astype("<u8")
    word_bytes = chunk_words.view(np.uint8).reshape(*chunk_words.shape, 8)[..., : layout.bytes_per_word]
    return np.moveaxis(word_bytes, -1, -2)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` with the decoder's shift formula: [..., B, N] -> uint8 codes [..., count]."""
    layout = WordLayout(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    byte_shifts = np.arange(layout.bytes_per_word, dtype=np.uint64)[:, None] * np.uint64(8)
    words = (packed.astype(np.uint64) << byte_shifts).sum(axis=-2, dtype=np.uint64).astype(layout.word_dtype)
    right = layout.word_dtype.type(layout.right_shift())
    planes = [(words << shift) >> right for shift in layout.left_shifts()]
    return np.concatenate(planes, axis=-1)[..., :count].astype(np.uint8)
