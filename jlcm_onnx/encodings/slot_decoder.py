"""Decoders of weights whose codes are looked up a byte at a time (:mod:`jlcm_onnx.encodings.slot_tables`).

Each code slot's rows [R_s, cols] are decoded on their own: looked up in their table, scaled and shifted per input
block, and patched with their outliers (``ScatterND`` of the slot's own (row, column) pairs, so decoders of one shape
share one function whatever their outlier counts). A MatMul multiplies the slots in turn
(:mod:`jlcm_onnx.encodings.blocked_products`); any other consumer reads ``W^ = Concat_s(W^_s)``, its rows restored and
moved back to W's layout. The stored tensors are the weight's (codebooks, input blocks) stored once, each slot
reading its rows of them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import helper

from jlcm_onnx.encodings.codebook_decoder import (
    DecodeGraph,
    DecoderBuilder,
    DecodeSpec,
    block_affine,
    build_decoder,
    cast_to,
    finish_rows_first,
    restored,
    row_codebooks,
    window_rows,
)
from jlcm_onnx.encodings.slot_tables import looked_up_slots, slot_ranges, uses_slot_tables
from jlcm_onnx.ir.graph_building import ConstantPool, NameAllocator


def build_slot_decoders(spec: DecodeSpec, names: NameAllocator, pool: ConstantPool,
                        gate: str | None) -> tuple[DecodeGraph, list[str]]:
    """The decoder of a weight whose codes are looked up a byte at a time, left in its code slots: the graph and
    the name of each slot's rows [R_s, cols] (:func:`decoded_slots`), for a consumer that multiplies them in turn."""
    b = DecoderBuilder(spec, names, pool, shared={})  # the weight's tensors stored once, read by every slot
    parts = decoded_slots(b, spec, gate)
    return DecodeGraph(b.nodes, b.initializers), parts


def build_weight_decoder(spec: DecodeSpec, names: NameAllocator, pool: ConstantPool, gate: str | None) -> DecodeGraph:
    """The decoder of a whole weight (:func:`~jlcm_onnx.encodings.codebook_decoder.build_decoder`), its codes looked up
    a byte at a time where they allow it: ``W^ = Concat_s(W^_s)``, rows restored, in W's layout."""
    if not uses_slot_tables(spec.encoded):
        return build_decoder(spec, names, pool, gate)
    b = DecoderBuilder(spec, names, pool, shared={})  # the weight's tensors stored once, read by every slot
    parts = decoded_slots(b, spec, gate)
    decoded = b.op("Concat", parts, axis=0) if len(parts) > 1 else parts[0]
    finish_rows_first(b, spec, restored(b, decoded, axis=0))
    return DecodeGraph(b.nodes, b.initializers)


def decoded_slots(b: DecoderBuilder, spec: DecodeSpec, gate: str | None) -> list[str]:
    """The rows of each code slot of ``spec``'s weight, decoded in encoded order [R_s, cols] in W's type (input blocks
    and outliers applied), one under the other making the whole. ``b`` shares stored tensors by name (``shared``), so
    the weight's codebooks and input blocks are stored once and each slot reads its rows of them."""
    encoded = spec.encoded
    rows, cols = encoded.shape
    rows_first = replace(spec, shape=(rows, cols), row_axis=0)
    windows = slot_ranges(rows, encoded.index_bits)
    books = row_codebooks(b, rows_first, spec.dtype)
    tables = [books] if len(windows) == 1 else [window_rows(b, books, *window) for window in windows]
    table_dtype = helper.tensor_dtype_to_np_dtype(spec.dtype)
    looked_up = looked_up_slots(b, encoded.codes, encoded.index_bits, tables, table_dtype, gate)
    affine = [block_affine(b, rows_first, decoded, window=window) for window, decoded in zip(windows, looked_up,
                                                                                              strict=True)]
    return _slot_outliers(b, rows_first, affine, windows, spec.dtype)


def _slot_outliers(b: DecoderBuilder, spec: DecodeSpec, decoded: list[str], windows: list[tuple[int, int]],
                   dtype: int) -> list[str]:
    """Writes each code slot's outliers over its rows (``decoded``, of type ``dtype``) with ScatterND: each slot stores
    its own (row in the slot, column) pairs, uint16 where both fit, and values, so that decoders of one shape share
    their function whatever their outlier counts."""
    encoded = spec.encoded
    cols = encoded.shape[1]
    order = np.argsort(encoded.outlier_index)
    index, values = encoded.outlier_index[order], encoded.outlier_values[order]
    bounds = np.searchsorted(index, [first * cols for first, _ in windows] + [encoded.codes.size])
    wide = max(windows[0][1], cols) > np.iinfo(np.uint16).max + 1  # the first slot is the fullest
    patched = []
    for slot, (part, (first, _), low, high) in enumerate(zip(decoded, windows, bounds[:-1], bounds[1:], strict=True)):
        if low < high:
            pairs = np.stack([index[low:high] // cols - first, index[low:high] % cols], axis=1)
            pairs = b.op("Cast", [b.stored(f"outlier_pairs{slot}", pairs.astype(np.int32 if wide else np.uint16))],
                         to=onnx.TensorProto.INT64)
            slot_values = b.stored(f"outlier_values{slot}", values[low:high])
            slot_values = cast_to(b, slot_values, helper.np_dtype_to_tensor_dtype(values.dtype), dtype)
            part = b.op("ScatterND", [part, pairs, slot_values])
        patched.append(part)
    return patched
