"""Adding nodes to an existing graph: fresh names, small constants shared by the new nodes, and the decode gate.

The decode gate is ``Cast(Size(x) - Size(x), uint8)`` for an activation ``x`` of the weight's consumer. A decoder
shifts its packed codes by it: that changes nothing, but it makes the decode depend on run-time data, so onnxruntime
can neither constant-fold it into a dense initializer at load time nor run it before the layer's input exists. Its
nodes are named under :data:`GATE_PREFIX`, which is how :func:`jlcm_onnx.ir.runtime.fold_at_load` finds them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: Name prefix of the gate nodes (see :func:`build_gate`).
GATE_PREFIX = "jlcm/gate"
#: The input name a decoder reads its gate by until the gate is built (its nodes are added last, before the call).
GATE_PLACEHOLDER = "__jlcm_gate__"


class NameAllocator:
    """Hands out tensor and node names not used anywhere in the model."""

    def __init__(self, used: set[str]) -> None:
        self._used = set(used)

    def fresh(self, base: str) -> str:
        name, counter = base, 1
        while name in self._used:
            name, counter = f"{base}_{counter}", counter + 1
        self._used.add(name)
        return name


class ConstantPool:
    """Small constants (shapes, shifts, axes) shared by all decoders of one graph."""

    def __init__(self, names: NameAllocator) -> None:
        self.names = names
        self.initializers: list[onnx.TensorProto] = []
        self._by_value: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def get(self, array: np.ndarray) -> str:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._by_value:
            name = self.names.fresh("jlcm/const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._by_value[key] = name
        return self._by_value[key]


def build_gate(activation: str, names: NameAllocator) -> tuple[str, list[onnx.NodeProto]]:
    """A uint8 zero that depends on ``activation`` at run time (see the module docstring)."""
    size, zero, gate = (names.fresh(f"{GATE_PREFIX}/{part}") for part in ("size", "zero", "gate"))
    nodes = [
        helper.make_node("Size", [activation], [size], name=size),
        helper.make_node("Sub", [size, size], [zero], name=zero),
        helper.make_node("Cast", [zero], [gate], to=onnx.TensorProto.UINT8, name=gate),
    ]
    return gate, nodes
