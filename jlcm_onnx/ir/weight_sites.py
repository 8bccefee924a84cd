"""Finds the compressible weights of a model and the nodes that read them.

A *weight site* is a float tensor stored in the model (an initializer or a ``Constant`` node, in the main graph or in an
``If``/``Loop``/``Scan`` body) together with its consumers. Names are resolved by ONNX scoping rules: a subgraph sees
the names of its enclosing graphs unless it defines the same name itself.

A weight is compressible when at least one consumer reads it as the weight input of MatMul (B), Gemm (B), Conv,
ConvTranspose (W), Gather (data) or LSTM/GRU/RNN (W, R). That consumer also defines the weight's *output rows*
(docs/method.md, section 1): the ``row_axis`` such that ``moveaxis(W, row_axis, 0).reshape(rows, -1)`` is the matrix
whose rows are output neurons. A tensor no weight input reads may still be read as plain data by an elementwise op,
Concat or Slice (:data:`~jlcm_onnx.config.DATA_READERS`: a learned positional table, an STFT basis, a hand-written
cell's weights cut by Slice); its rows are then its first axis of more than one element, provided another such axis
follows (vectors and broadcast rows are biases and scales) and every value is finite (masks of -inf stay dense).
Every other tensor gets a reason, so the report can say why it was left alone.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from jlcm_onnx.config import DATA_READERS, WEIGHT_SLOTS, CompressionConfig
from jlcm_onnx.ir.lazy_weights import tensor_array

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Consumer:
    """Input ``input_index`` of ``node`` (which lives in ``graph``) reads the weight."""

    graph: onnx.GraphProto
    node: onnx.NodeProto
    node_index: int
    input_index: int

    def describe(self) -> str:
        return f"{self.node.op_type}:{self.node.name or self.node.output[0]}"

    def layer(self) -> str:
        """Where the weight is used, for a reader: ``layers.3.attention.query (MatMul)``."""
        return f"{module_path(self.node)} ({self.node.op_type})"


#: Node metadata in which torch's dynamo exporter lists a node's module scopes, outermost first, then the op's own name.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def module_path(node: onnx.NodeProto) -> str:
    """The module a node belongs to: the innermost scope of torch's dynamo exporter (``['', 'layers.3',
    'layers.3.query', 'linear']`` -> ``layers.3.query``), else the node's name without its last segment (the
    TorchScript exporter's ``/layers.3/query/MatMul`` -> ``layers.3/query``), else its name or first output."""
    scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES_KEY), "")
    try:
        modules = [scope for scope in ast.literal_eval(scopes)[:-1] if scope] if scopes else []
    except (ValueError, SyntaxError, TypeError):
        modules = []
    if modules:
        return str(modules[-1])
    name = node.name.strip("/")
    return name.rsplit("/", 1)[0] if "/" in name else name or node.output[0]


@dataclass
class WeightSite:
    """A float tensor stored in the model, where it is defined and who reads it."""

    name: str
    graph: onnx.GraphProto
    tensor: onnx.TensorProto
    constant_node: onnx.NodeProto | None
    consumers: list[Consumer] = field(default_factory=list)
    is_graph_output: bool = False
    #: The model's ai.onnx opset, which bounds the operators and types its decoder may use.
    opset: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.dims)

    @property
    def layer(self) -> str:
        """Where the weight is read, for a reader: each consumer's :meth:`Consumer.layer`, once each."""
        return ", ".join(dict.fromkeys(c.layer() for c in self.consumers))

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def array(self) -> np.ndarray:
        return tensor_array(self.tensor)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx (default-domain) opset."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def find_weight_sites(model: onnx.ModelProto) -> list[WeightSite]:
    """Every float initializer and float ``Constant`` of the model and its subgraphs, with their consumers."""
    sites: list[WeightSite] = []
    _walk(model.graph, {}, sites)
    opset = default_opset(model)
    for site in sites:
        site.opset = opset
    return sites


def _walk(graph: onnx.GraphProto, outer: dict[str, WeightSite | None], sites: list[WeightSite]) -> None:
    scope = dict(outer)
    for value in graph.input:
        scope[value.name] = None
    for tensor in graph.initializer:
        scope[tensor.name] = _new_site(tensor.name, graph, tensor, None, sites)
    for position, node in enumerate(graph.node):
        for index, name in enumerate(node.input):
            site = scope.get(name)
            if site is not None:
                site.consumers.append(Consumer(graph, node, position, index))
        for subgraph in _subgraphs(node):
            _walk(subgraph, scope, sites)
        tensor = _constant_tensor(node)
        for name in node.output:
            scope[name] = _new_site(name, graph, tensor, node, sites) if tensor is not None else None
    for value in graph.output:
        site = scope.get(value.name)
        if site is not None and site.graph is graph:
            site.is_graph_output = True


def _new_site(
    name: str, graph: onnx.GraphProto, tensor: onnx.TensorProto, node: onnx.NodeProto | None, sites: list[WeightSite]
) -> WeightSite | None:
    if tensor.data_type not in FLOAT_TYPES:
        return None
    site = WeightSite(name, graph, tensor, node)
    sites.append(site)
    return site


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
            return attribute.t
    return None


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and all its nested subgraphs, outermost first."""
    yield graph
    for node in graph.node:
        for subgraph in _subgraphs(node):
            yield from iter_graphs(subgraph)


def names_read_in_bodies(node: onnx.NodeProto) -> set[str]:
    """Names read anywhere inside ``node``'s subgraphs (a superset of the outer-scope names they capture)."""
    names: set[str] = set()
    for subgraph in _subgraphs(node):
        for graph in iter_graphs(subgraph):
            names.update(name for inner in graph.node for name in inner.input if name)
            names.update(value.name for value in graph.output)
    return names


#: Recurrent ops whose W and R weights are [directions, gates * hidden, inputs].
RECURRENT = frozenset({"LSTM", "GRU", "RNN"})


def weight_row_axis(consumer: Consumer, shape: tuple[int, ...]) -> int | None:
    """The output-row axis of the weight of ``shape`` read by ``consumer``, or None if it does not read it as a weight
    (nor as data it can be compressed as: :func:`data_row_axis`)."""
    node = consumer.node
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in DATA_READERS:
        return data_row_axis(shape)
    if consumer.input_index not in WEIGHT_SLOTS.get(node.op_type, ()):
        return None
    rank = len(shape)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        return rank - 1 if rank >= 2 else None
    if node.op_type == "Gemm":
        return (0 if attributes.get("transB", 0) else 1) if rank == 2 else None
    if node.op_type == "Conv":
        return 0 if rank >= 3 else None
    if node.op_type == "ConvTranspose":
        return 1 if rank >= 3 else None
    if node.op_type in RECURRENT:
        return 1 if rank == 3 else None  # rows are gate outputs; a row holds them for every direction
    axis = int(attributes.get("axis", 0))  # Gather: rows are the slices it picks
    return axis % rank if rank >= 2 else None


def data_row_axis(shape: tuple[int, ...]) -> int | None:
    """The rows of a tensor read as plain data: its first axis of more than one element, when another such axis
    follows; None for a vector or a row broadcast along the other axes (a bias or a scale)."""
    wide = [axis for axis, size in enumerate(shape) if size > 1]
    return wide[0] if len(wide) >= 2 else None


def compressible_row_axis(site: WeightSite, config: CompressionConfig) -> tuple[int | None, str]:
    """(row axis, "") when ``site`` is to be compressed under ``config``, else (None, the reason it is not).

    A weight input decides the rows; a data reader (:data:`~jlcm_onnx.config.DATA_READERS`) only when no weight input
    reads the tensor."""
    readers = [c for c in site.consumers if c.node.op_type in config.op_types]
    as_weight = [c for c in readers if c.node.op_type not in DATA_READERS]
    as_data = not any(weight_row_axis(c, site.shape) is not None for c in as_weight)
    axes = [weight_row_axis(c, site.shape) for c in (readers if as_data else as_weight)]
    axes = [axis for axis in axes if axis is not None]
    if not axes:
        return None, _not_a_weight(site, config)
    if site.num_elements < config.min_elements:
        return None, f"{site.num_elements} elements < min_elements={config.min_elements}"
    if config.include and not any(fnmatch.fnmatchcase(site.name, p) for p in config.include):
        return None, "name matches no 'include' pattern"
    if any(fnmatch.fnmatchcase(site.name, p) for p in config.exclude):
        return None, "name matches an 'exclude' pattern"
    if site.is_graph_output:
        return None, "is a graph output"
    if as_data and not np.isfinite(site.array()).all():
        return None, "holds infinite or NaN values (a mask?): kept exact"
    return axes[0], ""


def compressible_sites(model: onnx.ModelProto, config: CompressionConfig) -> list[tuple[WeightSite, int]]:
    """Every weight site of ``model`` that ``config`` compresses, with its row axis, in graph order: the one place
    that decides (:func:`compressible_row_axis`)."""
    found = ((site, compressible_row_axis(site, config)[0]) for site in find_weight_sites(model))
    return [(site, row_axis) for site, row_axis in found if row_axis is not None]


def _not_a_weight(site: WeightSite, config: CompressionConfig) -> str:
    """Why no consumer of ``site`` reads it as a weight or as compressible data."""
    for consumer in site.consumers:
        node = consumer.node
        if node.op_type in config.op_types and node.op_type in WEIGHT_SLOTS:
            if consumer.input_index not in WEIGHT_SLOTS[node.op_type]:
                return f"input {consumer.input_index} of {consumer.describe()}, a bias or a state, not a weight"
        elif node.op_type in config.op_types and node.op_type in DATA_READERS:
            return f"a vector or a broadcast row of shape {list(site.shape)} read by {node.op_type}: biases and " \
                   "scales stay dense"
    kinds = sorted({c.node.op_type for c in site.consumers}) or ["nothing"]
    return f"read by {', '.join(kinds)}: not a weight or data input of a consumer in op_types"


def anchor_index(site: WeightSite) -> int:
    """Position in ``site.graph`` of the first node that reads the weight, itself or from inside one of its
    ``If``/``Loop``/``Scan`` bodies (an outer-scope reference): where a decoder of the weight must run."""
    positions = []
    for consumer in site.consumers:
        if consumer.graph is site.graph:
            positions.append(consumer.node_index)
        else:
            positions.append(next(position for position, node in enumerate(site.graph.node)
                                  if any(consumer.graph is g for sub in _subgraphs(node) for g in iter_graphs(sub))))
    return min(positions)


def is_lone_matrix_input(site: WeightSite, row_axis: int, op_type: str, input_index: int) -> bool:
    """True when the [rows, cols] weight has one reader, an ``op_type`` node of its own graph that reads it as input
    ``input_index`` only and finds its rows along ``row_axis`` (the axis ``row_axis`` is checked against)."""
    if len(site.consumers) != 1 or len(site.shape) != 2:
        return False
    consumer = site.consumers[0]
    return (consumer.graph is site.graph and consumer.node.op_type == op_type and consumer.input_index == input_index
            and list(consumer.node.input).count(site.name) == 1 and weight_row_axis(consumer, site.shape) == row_axis)


def transposed_matmul(consumer: Consumer) -> Consumer | None:
    """The MatMul that reads ``Transpose(W)`` (a [rows, cols] W, perm [1, 0], its only reader) as its B, computing
    ``A @ W^T`` (a tied language-model head): W's rows are that layer's outputs too. None for any other consumer."""
    node = consumer.node
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or perm != [1, 0]:
        return None
    readers = [(position, reader) for position, reader in enumerate(consumer.graph.node)
               if node.output[0] in reader.input]
    if len(readers) != 1:
        return None
    position, reader = readers[0]
    if reader.op_type != "MatMul" or list(reader.input).index(node.output[0]) != 1:
        return None
    return Consumer(consumer.graph, reader, position, 1)


def is_lone_table_gather(site: WeightSite, row_axis: int) -> bool:
    """True when the weight is a [rows, cols] table read only by one Gather along its rows."""
    return row_axis == 0 and is_lone_matrix_input(site, row_axis, "Gather", 0)


def tied_head(site: WeightSite) -> tuple[Consumer, Consumer] | None:
    """(the Transpose, the head MatMul) of a [V, D] initializer read by exactly one Gather (rows) and one transposed
    MatMul, none of them a graph output; else None."""
    if site.constant_node is not None or len(site.shape) != 2 or len(site.consumers) != 2:
        return None
    kinds = {consumer.node.op_type: consumer for consumer in site.consumers}
    gather, transpose = kinds.get("Gather"), kinds.get("Transpose")
    if (gather is None or transpose is None or gather.input_index != 0 or gather.graph is not site.graph
            or transpose.graph is not site.graph):
        return None
    axis = next((a.i for a in gather.node.attribute if a.name == "axis"), 0)
    matmul = transposed_matmul(transpose)
    outputs = {value.name for value in site.graph.output}
    if axis != 0 or matmul is None or transpose.node.output[0] in outputs:
        return None
    return transpose, matmul


def is_tied_table(site: WeightSite, row_axis: int) -> bool:
    """True when the weight is a [V, D] table read by one Gather along its rows and, transposed, by a head MatMul."""
    return row_axis == 0 and tied_head(site) is not None


def is_row_packed(site: WeightSite, row_axis: int) -> bool:
    """True when the weight is stored a row at a time and read through row decoders: a table read by one Gather,
    alone (with no outliers) or tied to a head (with as many outliers in every row, which its row decoders patch)."""
    return is_lone_table_gather(site, row_axis) or is_tied_table(site, row_axis)
