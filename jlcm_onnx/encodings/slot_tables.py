"""Codes of 2, 4 or 8 bits looked up a whole byte at a time: no bit arithmetic on the weights at run time.

A byte holds ``L = 8 / b`` codes. They are taken from L different rows of the same column, so that a byte is one
index into a table of 256 values per row, one table per *slot*. With ``R' = ceil(R / L)`` rows per slot, row
``s R' + i`` of W [R, cols] is slot s of row i of the stored bytes P [R', cols]::

    P[i, c] = sum_s I[s R' + i, c] << (s b)                           (rows past R count as code 0)

Slot s's rows are looked up in the table ``T_s[i, v] = C[s R' + i, (v >> s b) & (K - 1)]``, their row codebooks
C_s [R_s, K] spread over the 256 byte values by a one-hot ``S_s[k, v] = [(v >> s b) & (K - 1) = k]`` (exact: one
product by 1 per entry, the others by 0)::

    T_s  = C_s @ S_s                                                  [R_s, 256]   (K = 256: T = C)
    W^_s = GatherElements(T_s, Cast(P, int32), axis=1)                [R_s, cols]

Each weight costs one GatherElements element and a share of one Cast of its byte, where shifting codes out of words
(:mod:`jlcm_onnx.encodings.packing`) costs a BitShift pass over the bytes per code in them: a 1536 x 1536 layer at 4
bits decodes about 2x faster this way (``python bench/decode_speed.py``). A consumer that can multiply the slots one
at a time (a MatMul: ``X @ W^_s^T`` for each, :mod:`jlcm_onnx.encodings.blocked_products`) never concatenates them;
others get ``W^ = Concat_s(W^_s)`` [R, cols]. The tables and one-hots are made on every run, ``256 (R + K L)`` values,
and freed with the layer: the decode gate (a run-time zero, :mod:`jlcm_onnx.ir.graph_building`) enters the shape of
the stored bytes' Reshape and the start of the byte values' Range, so onnxruntime folds neither at load and keeps no
table.

Stored bytes: ``ceil(R / L) cols``, exactly ``n b / 8`` when L divides R. The rows are W's output rows in the
decoder's rows-first view ([out, in] for MatMul's [in, out]), which is transposed last; onnxruntime folds that
Transpose into the product (``FusedMatMul``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from jlcm_onnx.encodings.codebook import EncodedMatrix

if TYPE_CHECKING:
    from jlcm_onnx.encodings.codebook_decoder import DecoderBuilder

#: Code widths looked up by slot tables: a byte holds a whole number of them. 1-bit codes would take 8 slots, each
#: with its own table and product (a decoder twice the size of 2-bit's); they keep the word layout.
SLOT_BITS = (2, 4, 8)
#: Fewest weights per row for slot tables: every row builds a table of 256 values, which costs more than the shifts it
#: saves on short rows (a 3x3 depthwise convolution's 9 weights: EfficientNet-Lite0 at 4 bits ran 2.3x slower).
SLOT_MIN_COLS = 128


def uses_slot_tables(encoded: EncodedMatrix) -> bool:
    """True when a weight decoder reads ``encoded``'s codes a byte at a time."""
    return slot_layout(encoded.index_bits, encoded.vector_dim, encoded.shape[1])


def slot_layout(bits: int, vector_dim: int, cols: int) -> bool:
    """True for scalar codes of 2, 4 or 8 bits in rows of at least :data:`SLOT_MIN_COLS` weights."""
    return vector_dim == 1 and bits in SLOT_BITS and cols >= SLOT_MIN_COLS


def slot_rows(rows: int, bits: int) -> int:
    """``R' = ceil(R / L)``: the rows of stored bytes of R rows of codes."""
    return -(-rows // (8 // bits))


def slot_packed_bytes(rows: int, cols: int, bits: int) -> int:
    return slot_rows(rows, bits) * cols


def pack_slots(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [R, cols] of ``bits`` bits as bytes [ceil(R / L), cols], slot s of byte row i holding row ``s R' + i``."""
    rows, cols = codes.shape
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes up to {int(codes.max())} do not fit in {bits} bits")
    per_slot = slot_rows(rows, bits)
    packed = np.zeros((per_slot, cols), dtype=np.uint8)
    for slot, first in enumerate(range(0, rows, per_slot)):
        part = codes[first:first + per_slot].astype(np.uint8)
        packed[:part.shape[0]] |= part << np.uint8(slot * bits)
    return packed


def unpack_slots(packed: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Inverse of :func:`pack_slots`: uint8 codes [rows, cols]."""
    mask = np.uint8((1 << bits) - 1)
    slots = [(packed >> np.uint8(slot * bits)) & mask for slot in range(8 // bits)]
    return np.concatenate(slots, axis=0)[:rows]


def slot_ranges(rows: int, bits: int) -> list[tuple[int, int]]:
    """``(first row, rows)`` of each slot that holds rows: slot s holds rows ``[s R', min((s + 1) R', R))``."""
    per_slot = slot_rows(rows, bits)
    return [(first, min(per_slot, rows - first)) for first in range(0, rows, per_slot)]


def looked_up_slots(b: DecoderBuilder, codes: np.ndarray, bits: int, tables: list[str], table_dtype: np.dtype,
                    gate: str | None) -> list[str]:
    """Nodes decoding ``codes`` [R, cols] of ``bits`` bits (stored by :func:`pack_slots`): slot s's rows [R_s, cols]
    looked up in ``tables[s]``, the codebooks of its rows [R_s, K] (of type ``table_dtype``); ``gate`` (a uint8 zero
    computed at run time) keeps onnxruntime from folding them."""
    rows, cols = codes.shape
    entries, per_slot = 1 << bits, slot_rows(rows, bits)
    slots = slot_ranges(rows, bits)
    zero = None if gate is None else b.op("Cast", [gate], to=onnx.TensorProto.INT64)
    packed = b.stored("packed", lambda: pack_slots(codes, bits))
    if zero is not None:
        packed = b.op("Reshape", [packed, b.op("Add", [b.shape([per_slot, cols]), zero])])
    index = b.op("Cast", [packed], to=onnx.TensorProto.INT32)
    if entries < 256:  # the one-hots S_s [K, 256] of all slots: [L, K, 256]
        byte_values = b.op("Range", [zero or b.const(np.int64(0)), b.const(np.int64(256)), b.const(np.int64(1))])
        divisors = (entries ** np.arange(len(slots), dtype=np.int64)).reshape(-1, 1, 1)
        slot_codes = b.op("Mod", [b.op("Div", [byte_values, b.const(divisors)]), b.const(np.int64(entries))])
        codewords = b.const(np.arange(entries, dtype=np.int64).reshape(entries, 1))
        table_type = helper.np_dtype_to_tensor_dtype(table_dtype)
        spreads = b.op("Cast", [b.op("Equal", [slot_codes, codewords])], to=table_type)
    looked_up = []
    for slot, ((_, count), table) in enumerate(zip(slots, tables, strict=True)):
        if entries < 256:
            table = b.op("MatMul", [table, b.op("Gather", [spreads, b.const(np.int64(slot))], axis=0)])
        rows_index = index
        if count < per_slot:
            rows_index = b.op("Slice", [index, b.shape([0]), b.shape([count]), b.shape([0])])
        looked_up.append(b.op("GatherElements", [table, rows_index], axis=1))
    return looked_up
