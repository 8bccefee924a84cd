"""The ONNX decode subgraph of one compressed weight, built from standard ops (opset 11 and up).

Whole weights with codes of 2, 4 or 8 bits are looked up a byte at a time instead
(:mod:`jlcm_onnx.encodings.slot_decoder`, with the steps below that it shares); this module decodes every other code
width, embedding rows and vector codebooks.

Stored per weight: ``packed``, uint8 byte planes of the codes at exactly b bits (:mod:`jlcm_onnx.encodings.packing`),
and ``codebooks`` [G, K] in the codebook dtype (plus a uint8/uint16 row-to-group map when groups differ in size).
Decoded::

    live   = BitShift(packed, gate)                               gate: uint8 zero computed from the consumer's input
    words  = sum_k Cast(live[k]) << 8k                            (uint32/uint64; skipped when B == 1)
    codes  = Concat_s((words << (W - (s+1) b)) >> (W - b))        each op is plane-by-scalar
    C_rows = C[g(r)]                                              [rows, K]   (C itself, Expand, or Gather)
    W^     = GatherElements(C_rows, codes, axis=1)                [rows, cols] -> Reshape/Transpose to W's layout

With input blocks of B, ``W^`` is then padded to whole blocks, viewed as [rows, cols / B, B], multiplied by the block
scales [rows, cols / B, 1] and shifted by the offsets (broadcast), and viewed back (Pad/Slice only when B does not
divide cols).

When the output rows are W's last axis (MatMul's B [in, out]) codes are stored in W's own order [cols, rows] and
``W^ = GatherElements(C_rows^T, codes, axis=0)``, which needs no transpose of the decoded weight.

Vector codebooks (a code per d consecutive inputs of a row, codebooks [G, K, d]) are looked up as scalar ones are,
in every row's codebook flattened to [rows, K d], at the element ``I[r, j] d + a`` of input ``j d + a``::

    W^ = GatherElements(C_rows, Reshape(Reshape(codes, [rows, cols / d, 1]) * d + [0..d-1], [rows, cols]), axis=1)

Codebooks stored in a narrower float type than W (fp16 codebooks of an fp32 model) are looked up, patched with
outliers and re-ordered in that type, and ``W^`` is cast to W's type last: every step before the cast only moves values,
so the result is the same bit for bit, and the largest transient (the int32 codes beside the gathered matrix) is 1.5x
the dense weight instead of 2x. Multi-scaling tables and input blocks, which need arithmetic, are cast first.

``gate`` (:mod:`jlcm_onnx.ir.graph_building`) is a uint8 zero computed from an activation of the consumer: weights stay
packed in memory and are decoded one layer at a time, when the layer's input exists.

An embedding table read only by ``Gather`` is packed row by row ([rows, B, N]) and its Gather is replaced by a *row
decoder* that gathers the packed rows and row codebooks of the requested ids first and decodes only those rows; the ids
are run-time data, so no gate is needed. A table tied to a language-model head is stored once
in that layout, with the same number of outliers in every row (their columns and values [rows, m], gathered with the
rows and written over them by ScatterElements); :mod:`jlcm_onnx.encodings.blocked_products` builds its head and the
blocked MatMul of a large weight from these decoders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from jlcm_onnx.encodings.codebook import EncodedMatrix
from jlcm_onnx.encodings.outliers import uniform_outliers
from jlcm_onnx.encodings.packing import WordLayout, pack_codes
from jlcm_onnx.ir.graph_building import ConstantPool, NameAllocator
from jlcm_onnx.ir.tensor_size import stored_bytes

FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class DecodeSpec:
    """What the decoder must produce: tensor ``output`` of ``dtype`` and ``shape``, rows along ``row_axis``.

    With ``gather_indices`` set, the decoder stands in for ``Gather(weight, gather_indices)`` (axis 0) and ``output``
    is that Gather's output. With ``restore`` set, the rows were encoded re-ordered and original row r is encoded row
    ``restore[r]``: a Gather puts them back (on the decoded weight, the looked-up ids, or a blocked MatMul's output).
    """

    output: str
    dtype: int
    shape: tuple[int, ...]
    row_axis: int
    encoded: EncodedMatrix
    gather_indices: str | None = None
    restore: np.ndarray | None = None

    @property
    def rows_last(self) -> bool:
        return self.gather_indices is None and len(self.shape) >= 2 and self.row_axis == len(self.shape) - 1


@dataclass
class DecodeGraph:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]

    @property
    def stored_bytes(self) -> int:
        return sum(stored_bytes(t) for t in self.initializers)


class DecoderBuilder:
    """Collects one weight's decoder: its stored tensors, shared constants and nodes. With ``shared`` (suffix ->
    name), a stored tensor some decoder of the same encoding already stored is read under that name, not stored again;
    the tensors this decoder stores are added to it."""

    def __init__(self, spec: DecodeSpec, names: NameAllocator, pool: ConstantPool,
                 shared: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.names = names
        self.pool = pool
        self.shared = shared
        self.prefix = names.fresh("jlcm/w")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def stored(self, suffix: str, array: np.ndarray | Callable[[], np.ndarray]) -> str:
        """A tensor that belongs to this weight's encoding (counted in its compressed size); ``array`` may be a
        function making it, called only when it is not shared already."""
        if self.shared is not None and suffix in self.shared:
            return self.shared[suffix]
        name = self.names.fresh(f"{self.spec.output}.jlcm_{suffix}")
        self.initializers.append(numpy_helper.from_array(np.asarray(array() if callable(array) else array), name))
        if self.shared is not None:
            self.shared[suffix] = name
        return name

    def const(self, array: np.ndarray | int) -> str:
        return self.pool.get(np.asarray(array))

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attributes: object) -> str:
        """Appends a node; its output is ``output`` (the weight's own name, say) or a fresh name, and its name is
        always fresh (a weight may share its name with a node of the model)."""
        name = self.names.fresh(f"{self.prefix}/{op_type.lower()}")
        self.nodes.append(helper.make_node(op_type, inputs, [output or name], name=name, **attributes))
        return output or name

    def shape(self, dims: tuple[int, ...] | list[int]) -> str:
        return self.const(np.array(dims, dtype=np.int64))

    def restore_index(self) -> str:
        """int32 [rows]: where each original row sits in the encoded order (stored as uint16 when it fits)."""
        restore = self.spec.restore
        compact = restore.astype(np.uint16 if restore.size <= np.iinfo(np.uint16).max + 1 else np.int32)
        return self.op("Cast", [self.stored("row_order", compact)], to=onnx.TensorProto.INT32)


def stored_code_order(spec: DecodeSpec) -> np.ndarray:
    """The codes as they are packed: [cols, rows] when rows are W's last axis, else [rows, cols]."""
    return spec.encoded.codes.T if spec.rows_last else spec.encoded.codes


def build_decoder(spec: DecodeSpec, names: NameAllocator, pool: ConstantPool, gate: str | None,
                  shared: dict[str, str] | None = None) -> DecodeGraph:
    """Initializers and nodes that compute ``spec.output`` from the packed codes and codebooks (reading the stored
    tensors named in ``shared``, see :class:`DecoderBuilder`)."""
    b = DecoderBuilder(spec, names, pool, shared)
    if spec.gather_indices is not None:
        _row_decoder(b, spec)
    else:
        _weight_decoder(b, spec, gate)
    return DecodeGraph(b.nodes, b.initializers)


def _weight_decoder(b: DecoderBuilder, spec: DecodeSpec, gate: str | None) -> None:
    layout = WordLayout(spec.encoded.index_bits)
    stored = stored_code_order(spec)
    packed = b.stored("packed", pack_codes(stored.reshape(-1), layout.bits))
    if gate is not None:
        packed = b.op("BitShift", [packed, gate], direction="LEFT")
    codes = unpack_codes(b, packed, layout, stored.size, rows=None)
    lookup = _lookup_dtype(spec)
    if spec.rows_last:
        decoded = block_affine(b, spec, _looked_up(b, spec, codes, lookup, stored_shape=stored.shape))
        decoded = restored(b, _with_outliers(b, spec, decoded, lookup), axis=1)
        finish_layout(b, cast_to(b, decoded, lookup, spec.dtype), spec.shape, perm=None)
        return
    decoded = block_affine(b, spec, _looked_up(b, spec, codes, lookup, stored_shape=stored.shape))
    decoded = _with_outliers(b, spec, decoded, lookup)
    finish_rows_first(b, spec, cast_to(b, restored(b, decoded, axis=0), lookup, spec.dtype))


def finish_rows_first(b: DecoderBuilder, spec: DecodeSpec, decoded: str) -> None:
    """Gives the decoded [rows, cols] matrix W's shape and layout (rows moved back to ``spec.row_axis``)."""
    others = [i for i in range(len(spec.shape)) if i != spec.row_axis]
    moved_shape = tuple(spec.shape[i] for i in [spec.row_axis, *others])
    perm = None if spec.row_axis == 0 else [int(i) for i in np.argsort([spec.row_axis, *others])]
    finish_layout(b, decoded, moved_shape, perm)


def _looked_up(b: DecoderBuilder, spec: DecodeSpec, codes: str, dtype: int, ids: str | None = None,
               stored_shape: tuple[int, ...] | None = None) -> str:
    """The codewords of ``codes`` (int32, in stored order: [rows, cols / d], [cols / d, rows] when rows are W's last
    axis, or the rows picked by ``ids``; flat, to be viewed as ``stored_shape``, when given), of type ``dtype``:
    [rows, cols] or [cols, rows]."""
    if spec.encoded.vector_dim > 1:
        if stored_shape is not None:
            codes = b.op("Reshape", [codes, b.shape(stored_shape)])
        return _looked_up_vectors(b, spec, codes, dtype, ids)
    books = row_codebooks(b, spec, dtype)
    if ids is not None:
        books = b.op("Gather", [books, ids], axis=0)
    if stored_shape is not None:
        codes = b.op("Reshape", [codes, b.shape(stored_shape)])
    if spec.rows_last:
        return b.op("GatherElements", [b.op("Transpose", [books], perm=[1, 0]), codes], axis=0)
    return b.op("GatherElements", [books, codes], axis=1)


def _looked_up_vectors(b: DecoderBuilder, spec: DecodeSpec, codes: str, dtype: int, ids: str | None) -> str:
    """Vector codewords: the codebook of every row flattened to [rows, K d], and each weight's element of it,
    ``I[r, j] d + a`` for input ``j d + a``, gathered by GatherElements as scalar codes are (no Transpose of the
    decoded weight; one Gather of d-wide rows costs onnxruntime about 5x more per weight)."""
    encoded = spec.encoded
    dim = encoded.vector_dim
    rows, cols = encoded.shape
    table = row_codebooks(b, spec, dtype)
    if ids is not None:
        table = b.op("Gather", [table, ids], axis=0)
    if spec.rows_last:  # codes [cols / d, rows] -> [cols / d, d, rows] -> [cols, rows]
        wide, place, flat = [-1, 1, rows], np.arange(dim, dtype=np.int32).reshape(1, dim, 1), [cols, rows]
    else:  # codes [rows, cols / d] -> [rows, cols / d, d] -> [rows, cols]
        wide, place, flat = [-1, cols // dim, 1], np.arange(dim, dtype=np.int32).reshape(1, 1, dim), [-1, cols]
    scaled = b.op("Mul", [b.op("Reshape", [codes, b.shape(wide)]), b.const(np.int32(dim))])
    index = b.op("Reshape", [b.op("Add", [scaled, b.const(place)]), b.shape(flat)])
    if spec.rows_last:
        return b.op("GatherElements", [b.op("Transpose", [table], perm=[1, 0]), index], axis=0)
    return b.op("GatherElements", [table, index], axis=1)


def _lookup_dtype(spec: DecodeSpec) -> int:
    """The float type the codebooks are looked up in: their stored type where it is narrower than the weight's and
    the decode needs no arithmetic on it (no multi-scaling, no input blocks, outliers of the same type), else the
    weight's type."""
    encoded = spec.encoded
    stored = encoded.codebooks.dtype
    exact = not (encoded.multi_scaling or encoded.blocked) and (
        encoded.outlier_index.size == 0 or encoded.outlier_values.dtype == stored)
    narrower = stored.kind == "f" and stored.itemsize < helper.tensor_dtype_to_np_dtype(spec.dtype).itemsize
    return helper.np_dtype_to_tensor_dtype(stored) if exact and narrower else spec.dtype


def cast_to(b: DecoderBuilder, name: str, current: int, to: int) -> str:
    return name if current == to else b.op("Cast", [name], to=to)


def restored(b: DecoderBuilder, decoded: str, axis: int) -> str:
    """Puts re-ordered rows back in their original order (a no-op without ``spec.restore``)."""
    return decoded if b.spec.restore is None else b.op("Gather", [decoded, b.restore_index()], axis=axis)


def block_affine(b: DecoderBuilder, spec: DecodeSpec, decoded: str, ids: str | None = None,
                  window: tuple[int, int] | None = None) -> str:
    """``s * C[I] + m`` per block of inputs (a no-op without input blocks); the decoded matrix is [rows, cols], or
    [cols, rows] when rows are W's last axis, or the rows picked by ``ids`` (the row decoder), or the ``count`` rows
    from ``first`` given as ``window`` (a code slot)."""
    encoded = spec.encoded
    if not encoded.blocked:
        return decoded
    rows, cols = encoded.shape
    size = encoded.block_size
    count = -(-cols // size)
    if spec.rows_last:
        axis, blocked, flat, stored_shape = 0, [count, size, rows], [count * size, rows], (count, 1, rows)
    else:
        axis, blocked, flat, stored_shape = 1, [-1, count, size], [-1, count * size], (rows, count, 1)
    per_block = [b.stored(part, (array.T if spec.rows_last else array).reshape(stored_shape))
                 for part, array in (("block_scales", encoded.block_scales), ("block_offsets", encoded.block_offsets))]
    if ids is not None:
        per_block = [b.op("Gather", [name, ids], axis=0) for name in per_block]
    if window is not None:
        per_block = [window_rows(b, name, *window) for name in per_block]
    if helper.np_dtype_to_tensor_dtype(encoded.block_scales.dtype) != spec.dtype:
        per_block = [b.op("Cast", [name], to=spec.dtype) for name in per_block]
    pad = count * size - cols
    if pad:
        decoded = b.op("Pad", [decoded, b.shape([0, 0, pad, 0] if axis == 0 else [0, 0, 0, pad])])
    scaled = b.op("Add", [b.op("Mul", [b.op("Reshape", [decoded, b.shape(blocked)]), per_block[0]]), per_block[1]])
    scaled = b.op("Reshape", [scaled, b.shape(flat)])
    return b.op("Slice", [scaled, b.shape([0]), b.shape([cols]), b.shape([axis])]) if pad else scaled


def _with_outliers(b: DecoderBuilder, spec: DecodeSpec, decoded: str, dtype: int) -> str:
    """Writes the outlier values over the decoded matrix of type ``dtype`` (in stored order) with ScatterElements."""
    encoded = spec.encoded
    if encoded.outlier_index.size == 0:
        return decoded
    rows, cols = encoded.shape
    index = encoded.outlier_index
    if spec.rows_last:  # canonical r * cols + c  ->  stored c * rows + r
        index = (index % cols) * rows + index // cols
    order = np.argsort(index)
    positions = b.stored("outlier_index", index[order].astype(np.int32))
    values = b.stored("outlier_values", encoded.outlier_values[order])
    values = cast_to(b, values, helper.np_dtype_to_tensor_dtype(encoded.outlier_values.dtype), dtype)
    flat = b.op("Reshape", [decoded, b.shape([-1])])
    patched = b.op("ScatterElements", [flat, positions, values], axis=0)
    return b.op("Reshape", [patched, b.shape([rows, cols] if not spec.rows_last else [cols, rows])])


def window_rows(b: DecoderBuilder, name: str, first: int, count: int) -> str:
    """Rows ``[first, first + count)`` of ``name``."""
    return b.op("Slice", [name, b.shape([first]), b.shape([first + count]), b.shape([0])])


def finish_layout(b: DecoderBuilder, decoded: str, shape: tuple[int, ...], perm: list[int] | None) -> None:
    """Reshape the decoded [rows, cols] matrix to ``shape``, transpose by ``perm``, and name it as the weight."""
    output = b.spec.output
    if len(shape) != 2:
        decoded = b.op("Reshape", [decoded, b.shape(shape)], output if perm is None else None)
    if perm is not None:
        decoded = b.op("Transpose", [decoded], output, perm=perm)
    if decoded != output:
        b.op("Identity", [decoded], output)


def _row_decoder(b: DecoderBuilder, spec: DecodeSpec) -> None:
    """Stands in for ``Gather(table, ids)``: gathers packed rows and row codebooks, then decodes only those rows."""
    layout = WordLayout(spec.encoded.index_bits)
    cols = spec.encoded.shape[1]
    packed = b.stored("packed", lambda: pack_codes(spec.encoded.codes, layout.bits))  # [rows, B, N]
    ids = spec.gather_indices
    flat_ids = b.op("Reshape", [ids, b.shape([-1])])
    if spec.restore is not None:
        flat_ids = b.op("Gather", [b.restore_index(), flat_ids], axis=0)
    picked = b.op("Gather", [packed, flat_ids], axis=0)
    codes = unpack_codes(b, picked, layout, spec.encoded.codes.shape[1], rows=True)
    lookup = _lookup_dtype(spec)
    decoded = block_affine(b, spec, _looked_up(b, spec, codes, lookup, flat_ids), flat_ids)
    decoded = cast_to(b, _row_outliers(b, spec, decoded, flat_ids, lookup), lookup, spec.dtype)
    out_shape = b.op("Concat", [b.op("Shape", [ids]), b.shape([cols])], axis=0)
    b.op("Reshape", [decoded, out_shape], spec.output)


def _row_outliers(b: DecoderBuilder, spec: DecodeSpec, decoded: str, ids: str, dtype: int) -> str:
    """Writes each looked-up row's outliers over it (the same number in every row: a column index and a value each,
    stored [rows, m] and gathered by ``ids``) with ScatterElements; a no-op without outliers."""
    encoded = spec.encoded
    rows, cols = encoded.shape
    per_row = uniform_outliers(encoded.outlier_index, rows, cols)
    if per_row is None:
        raise ValueError(f"{spec.output}: a row decoder needs as many outliers in every row")
    if per_row == 0:
        return decoded
    columns = (encoded.outlier_index % cols).reshape(rows, per_row).astype(np.uint16 if cols <= 1 << 16 else np.int32)
    columns = b.op("Cast", [b.op("Gather", [b.stored("outlier_columns", columns), ids], axis=0)],
                   to=onnx.TensorProto.INT32)
    values = b.stored("outlier_values", encoded.outlier_values.reshape(rows, per_row))
    values = cast_to(b, b.op("Gather", [values, ids], axis=0),
                     helper.np_dtype_to_tensor_dtype(encoded.outlier_values.dtype), dtype)
    return b.op("ScatterElements", [decoded, columns, values], axis=1)


def unpack_codes(b: DecoderBuilder, packed: str, layout: WordLayout, count: int, rows: bool | None,
                 to: int = onnx.TensorProto.INT32) -> str:
    """Codes of type ``to`` (int32: Gather indices) from byte planes: [B, N] -> [count], or per row [M, B, N] ->
    [M, count]."""
    byte_axis = 1 if rows else 0
    if layout.bytes_per_word == 1:
        words = packed
    else:
        wide = b.op("Cast", [packed], to=helper.np_dtype_to_tensor_dtype(layout.word_dtype))
        words = ""
        for k in range(layout.bytes_per_word):
            row = b.op("Slice", [wide, b.shape([k]), b.shape([k + 1]), b.shape([byte_axis])])
            if k:
                row = b.op("BitShift", [row, b.const(layout.word_dtype.type(8 * k))], direction="LEFT")
            words = b.op("Add", [words, row]) if words else row
    words = b.op("Reshape", [words, b.shape([-1, layout.num_words(count)] if rows else [-1])])
    right = layout.word_dtype.type(layout.right_shift())
    planes = []
    for left in layout.left_shifts():
        plane = b.op("BitShift", [words, b.const(left)], direction="LEFT") if left else words
        plane = b.op("BitShift", [plane, b.const(right)], direction="RIGHT") if right else plane
        planes.append(plane if layout.bytes_per_word == 1 else b.op("Cast", [plane], to=onnx.TensorProto.UINT8))
    axis = 1 if rows else 0
    codes = b.op("Concat", planes, axis=axis) if len(planes) > 1 else planes[0]
    if layout.num_words(count) * layout.codes_per_word != count:
        codes = b.op("Slice", [codes, b.shape([0]), b.shape([count]), b.shape([axis])])
    return codes if to == onnx.TensorProto.UINT8 else b.op("Cast", [codes], to=to)


def row_codebooks(b: DecoderBuilder, spec: DecodeSpec, dtype: int) -> str:
    """Nodes giving the codebook of every row, [rows, K], of type ``dtype``."""
    encoded = spec.encoded
    groups, entries = encoded.codebooks.shape[0], encoded.codebooks[0].size  # K d values per vector codebook
    rows = encoded.codes.shape[0]
    equal_groups = len(set(encoded.group_sizes)) == 1
    table_shape = (groups, entries) if groups == rows or not equal_groups else (groups, 1, entries)
    if encoded.multi_scaling:  # C[g] = s[g] * c, computed in float32
        scales = b.op("Cast", [b.stored("scales", encoded.scales.reshape(*table_shape[:-1], 1))], to=FLOAT)
        shared = b.op("Cast", [b.stored("shared_codebook", encoded.shared_codebook)], to=FLOAT)
        table = b.op("Mul", [scales, shared])
        stored_type = FLOAT
    else:
        table = b.stored("codebooks", encoded.codebooks.reshape(table_shape))
        stored_type = helper.np_dtype_to_tensor_dtype(encoded.codebooks.dtype)
    table = cast_to(b, table, stored_type, dtype)
    if groups == rows:
        return table
    if equal_groups:
        expanded = b.op("Expand", [table, b.shape([groups, rows // groups, entries])])
        return b.op("Reshape", [expanded, b.shape([rows, entries])])
    group_of_row = np.repeat(np.arange(groups), encoded.group_sizes).astype(np.uint8 if groups <= 256 else np.uint16)
    index = b.op("Cast", [b.stored("row_group", group_of_row)], to=onnx.TensorProto.INT32)
    return b.op("Gather", [table, index], axis=0)
