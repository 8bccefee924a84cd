"""Seeded synthetic inputs shaped and typed like a model's declared inputs: the one rule of the output check's spot
check and of ``verify`` without data.

Symbolic dims are ``batch`` on axis 0 and ``other`` elsewhere, the same symbol getting the same size in every input.
Floats are standard normal. Integer and boolean inputs named like a mask (``mask``) are ones; integers named like
token types (``type``, ``segment``) are zeros, and positions (``position``) ``0, 1, 2, ...`` along the last axis; other
integers (token ids, indices) are uniform in ``[0, high)``, other booleans uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from jlcm_onnx.errors import ModelError
from jlcm_onnx.ir.weight_sites import iter_graphs

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputDeclaration:
    """A graph input as the model declares it: whether it is a ``tensor`` (not a sequence or a map), its numpy
    ``dtype`` (None when it has none), and its ``dims`` (None when the shape is not declared), each a size, a symbol
    (a string) or None (unknown)."""

    name: str
    tensor: bool
    dtype: np.dtype | None
    dims: tuple[int | str | None, ...] | None


def declared_inputs(model: onnx.ModelProto) -> tuple[InputDeclaration, ...]:
    """The graph inputs a feed must provide (not those an initializer gives a value)."""
    initializers = {t.name for t in model.graph.initializer}
    declared = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = None
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                         for d in tensor_type.shape.dim)
        declared.append(InputDeclaration(value.name, value.type.WhichOneof("value") == "tensor_type", dtype, dims))
    return tuple(declared)


def synthetic_feed(inputs: Sequence[InputDeclaration], rng: np.random.Generator, batch: int = 1, other: int = 16,
                   high: int = 100) -> Feed:
    """One batch for ``inputs`` drawn from ``rng`` (see the module docstring)."""
    symbols: dict[str, int] = {}
    feed = {}
    for declared in inputs:
        shape = []
        for axis, dim in enumerate(declared.dims or ()):
            size = dim if isinstance(dim, int) and dim > 0 else (batch if axis == 0 else other)
            shape.append(symbols.setdefault(dim, size) if isinstance(dim, str) else size)
        feed[declared.name] = _values(declared, tuple(shape), rng, max(1, high))
    return feed


def gather_rows(model: onnx.ModelProto) -> int | None:
    """Rows of the smallest stored table a ``Gather`` reads (a bound for synthetic indices), or None."""
    stored = {t.name: t for g in iter_graphs(model.graph) for t in g.initializer}
    rows = [
        stored[node.input[0]].dims[0]
        for g in iter_graphs(model.graph) for node in g.node
        if node.op_type == "Gather" and node.input[0] in stored and stored[node.input[0]].dims
    ]
    return min(rows, default=None)


def _values(declared: InputDeclaration, shape: tuple[int, ...], rng: np.random.Generator, high: int) -> np.ndarray:
    name, dtype = declared.name.lower(), declared.dtype
    if dtype is None or dtype.kind not in "fiub":
        raise ModelError(f"model input '{declared.name}' is not a numeric tensor: synthetic inputs cannot be made for "
                         "it, give data")
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if "mask" in name:
        return np.ones(shape, dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if "type" in name or "segment" in name:
        return np.zeros(shape, dtype)
    if "position" in name and shape:
        return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
    return rng.integers(0, high, shape).astype(dtype)
