"""Products with a large decoded weight, computed a block of it at a time so that one block is decoded at once.

A large MatMul weight W [in, out] (rows last) is split into column blocks: ``Y = Concat_k(X @ W^[:, block k])``
(:func:`build_blocked_matmul`); a block whose codes are looked up a byte at a time (a MatMul weight of 2, 4 or 8
bits in rows of 128 or more, large or not) is multiplied one code slot at a time, ``X @ W^_s^T``, and never concatenated
(:mod:`jlcm_onnx.encodings.slot_decoder`). A table E [V, D] tied to a language-model head, ``logits = h @ E^T``,
is stored once, row by row, for its embedding's row decoder; the head becomes ``Concat_k(h @ Transpose(E^[rows_k]))``,
each block of rows looked up by the same row decoder (:func:`build_tied_head`). Block k+1 is gated on block k's
product (a decode gate, :mod:`jlcm_onnx.ir.graph_building`), so onnxruntime decodes one block at a time, after the one
before, and folds none of them at load.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import onnx
from onnx import helper

from jlcm_onnx.encodings.codebook_decoder import DecodeGraph, DecoderBuilder, DecodeSpec, build_decoder
from jlcm_onnx.encodings.slot_decoder import build_slot_decoders
from jlcm_onnx.encodings.slot_tables import uses_slot_tables
from jlcm_onnx.ir.graph_building import ConstantPool, NameAllocator, build_gate


def build_blocked_matmul(
    spec: DecodeSpec, matmul: onnx.NodeProto, boundaries: list[int], names: NameAllocator, pool: ConstantPool
) -> DecodeGraph:
    """Stands in for ``Y = MatMul(X, W)`` (W [in, out], rows last): ``Y = Concat_k(X @ W^[:, block k])``.

    Block k+1 is gated on the output of block k, so onnxruntime decodes one block of W at a time and the memory a large
    layer needs while it runs is that of one block, not of the whole decoded weight.
    """
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    activation, outputs = matmul.input[0], []
    for start, stop in pairwise(boundaries):
        gate, gate_nodes = build_gate(activation, names)
        block = DecodeSpec(names.fresh(f"{spec.output}.jlcm_block"), spec.dtype, (spec.shape[0], stop - start), 1,
                           spec.encoded.row_block(start, stop))  # encoded order; restored on the output
        if uses_slot_tables(block.encoded):
            decoder, parts = build_slot_decoders(block, names, pool, gate)
        else:
            decoder, parts = build_decoder(block, names, pool, gate), [block.output]
        nodes += [*gate_nodes, *decoder.nodes]
        initializers += decoder.initializers
        for part in parts:
            weight = part
            if part != block.output:  # a slot's rows [R_s, in]: X @ part^T (onnxruntime fuses the Transpose)
                weight = names.fresh(f"{part}.jlcm_transposed")
                nodes.append(helper.make_node("Transpose", [part], [weight], perm=[1, 0], name=weight))
            activation = names.fresh(f"{matmul.output[0]}.jlcm_block")
            nodes.append(helper.make_node("MatMul", [matmul.input[0], weight], [activation], name=activation))
            outputs.append(activation)
    output = matmul.output[0] if spec.restore is None else names.fresh(f"{matmul.output[0]}.jlcm_reordered")
    nodes.append(helper.make_node("Concat", outputs, [output], axis=-1, name=names.fresh("jlcm/concat")))
    if spec.restore is not None:
        b = DecoderBuilder(spec, names, pool)
        b.op("Gather", [output, b.restore_index()], matmul.output[0], axis=-1)
        nodes += b.nodes
        initializers += b.initializers
    return DecodeGraph(nodes, initializers)


def build_tied_head(spec: DecodeSpec, matmul: onnx.NodeProto, row_bounds: list[int], names: NameAllocator,
                    pool: ConstantPool, shared: dict[str, str]) -> DecodeGraph:
    """Stands in for ``logits = MatMul(h, Transpose(E))``, the head tied to a table E [V, D] that an embedding's row
    decoder reads too: ``logits = Concat_k(h @ Transpose(E^[rows_k]))``, the rows of block k looked up by a row decoder
    on the stored tensors named in ``shared`` (the embedding's: the table is stored once).

    Block k's ids are ``Range(s_k + gate, e_k)``, the gate computed from block k-1's product (from h for the first),
    so onnxruntime decodes one block of the table at a time, after the one before, and folds none of them at load.
    """
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    activation, outputs = matmul.input[0], []
    for start, stop in pairwise(row_bounds):
        gate, gate_nodes = build_gate(activation, names)
        offset, first, ids = (names.fresh(f"{spec.output}.jlcm_{part}") for part in ("offset", "first", "ids"))
        block = DecodeSpec(names.fresh(f"{spec.output}.jlcm_rows"), spec.dtype, (stop - start, spec.shape[1]), 0,
                           spec.encoded, gather_indices=ids, restore=spec.restore)
        decoder = build_decoder(block, names, pool, None, shared)
        transposed = names.fresh(f"{spec.output}.jlcm_transposed")
        activation = names.fresh(f"{matmul.output[0]}.jlcm_block")
        nodes += [*gate_nodes,
                  helper.make_node("Cast", [gate], [offset], to=onnx.TensorProto.INT64, name=offset),
                  helper.make_node("Add", [pool.get(np.array(start, np.int64)), offset], [first], name=first),
                  helper.make_node("Range", [first, pool.get(np.array(stop, np.int64)),
                                             pool.get(np.array(1, np.int64))], [ids], name=ids),
                  *decoder.nodes,
                  helper.make_node("Transpose", [block.output], [transposed], perm=[1, 0], name=transposed),
                  helper.make_node("MatMul", [matmul.input[0], transposed], [activation], name=activation)]
        initializers += decoder.initializers
        outputs.append(activation)
    nodes.append(helper.make_node("Concat", outputs, [matmul.output[0]], axis=-1, name=names.fresh("jlcm/concat")))
    return DecodeGraph(nodes, initializers)
