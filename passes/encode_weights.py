"""Replaces every compressible weight by packed codes, codebooks and a decode subgraph.

For a weight W with output rows along ``row_axis`` the pass encodes the matrix ``M = moveaxis(W, row_axis, 0)
.reshape(rows, cols)`` as ``M^[r, j] = C[g(r), I[r, j]]`` (:mod:`jlcm_onnx.encodings.codebook`), removes W (initializer
or ``Constant`` node) and inserts, right before W's first consumer, the nodes of
:mod:`jlcm_onnx.encodings.codebook_decoder` that produce a tensor of W's name, dtype and shape. Consumers are untouched,
except four that are rewritten so that less is decoded at a time: a lone embedding ``Gather`` (a row decoder decodes
only the looked-up rows), the lone ``MatMul`` of a large weight (split into column blocks decoded one after the other),
a table tied to a head (a row decoder for its Gather and, on the same stored tensors, for the head's blocks of rows)
and, for a weight in affine blocks (``speed="fast"``, :mod:`jlcm_onnx.encodings.affine_decoder`: a standard
DequantizeLinear), a Gemm reading it transposed (so onnxruntime can fuse it). Any other weight read by several nodes
is stored and decoded once. Weights inside ``If``/``Loop``/``Scan`` bodies are handled in their own
body; a weight defined outside a body and read inside it (an outer-scope reference) is decoded in its own graph, right
before the node that holds the body, and the body reads the decoded tensor by the same name. The weights are
encoded in parallel (data-free in graph order, with calibration statistics smallest first with the largest started
early, :func:`_encoding_order`): one per CPU core, or as jobs on worker processes or a Ray cluster (config
``workers`` and ``ray_address``, :mod:`jlcm_onnx.workers`; the same bytes). Their decoders are then built and
inserted in model order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx
from onnx import helper

from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.analysis.site_encoding import EncodeJob, encode_job, encode_site
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.devices import map_on_cores
from jlcm_onnx.encodings.base import DecoderContext, SiteEncoding, WrittenDecoder
from jlcm_onnx.ir.decoder_functions import DOMAIN, DecoderFunctions
from jlcm_onnx.ir.graph_building import GATE_PLACEHOLDER, ConstantPool, NameAllocator, build_gate
from jlcm_onnx.ir.weight_sites import (
    WeightSite,
    anchor_index,
    compressible_row_axis,
    default_opset,
    find_weight_sites,
    iter_graphs,
    names_read_in_bodies,
)
from jlcm_onnx.memory_budget import release_freed_memory
from jlcm_onnx.passes.base import Pass, PassResult
from jlcm_onnx.report import COMPRESSED, SKIPPED, TensorRecord
from jlcm_onnx.workers import Workers, map_jobs


@dataclass
class _Insertion:
    graph: onnx.GraphProto
    before_node: int
    site: WeightSite
    written: WrittenDecoder


#: With calibration statistics the largest tensor starts once the tensors after it hold at most this many bytes of
#: statistics, so that it runs beside them rather than alone at the end with a core idle.
OVERLAP_STATISTICS_BYTES = 256 << 20


def _encoding_order(todo: list[tuple[WeightSite, int]], plan: CompressionPlan) -> list[int]:
    """The order to encode ``todo`` in with calibration statistics: smallest first, so that the statistics of the
    others are mostly released when the largest (an LLM's embedding table, whose learning state is the run's peak)
    starts; it goes in as late as needed for the statistics still held beside it (a Gram shared by several tensors
    counted once) to stay within :data:`OVERLAP_STATISTICS_BYTES`."""
    order = sorted(range(len(todo)), key=lambda index: todo[index][0].num_elements)
    if not order:
        return order
    largest = order.pop()
    held, counted, position = 0, set(), len(order)
    while position > 0:
        statistics = plan.statistics.get(todo[order[position - 1]][0].name)
        gram = None if statistics is None else statistics.gram
        extra = 0 if gram is None or id(gram) in counted else gram.nbytes
        if held + extra > OVERLAP_STATISTICS_BYTES:
            break
        held, position = held + extra, position - 1
        if gram is not None:
            counted.add(id(gram))
    order.insert(position, largest)
    return order


class EncodeWeights(Pass):
    """The encoding pass; its result holds one :class:`TensorRecord` per float tensor."""

    needs = frozenset({"choices", "groupings"})  # and statistics and encodings, where a pass before made them

    def __init__(self, config: CompressionConfig, plan: CompressionPlan | None = None, progress: bool = False) -> None:
        self.config = config
        self.plan = plan or CompressionPlan(config)
        self.progress = progress

    def call(self, model: onnx.ModelProto) -> PassResult:
        sites = find_weight_sites(model)
        names = NameAllocator(_all_names(model.graph))
        pools: dict[int, ConstantPool] = {}
        constants = {site.name for site in sites} | _initializer_names(model.graph)
        records: list[TensorRecord] = []
        insertions: list[_Insertion] = []
        todo: list[tuple[WeightSite, int]] = []
        for site in sites:
            row_axis, reason = compressible_row_axis(site, self.config)
            if row_axis is None:
                records.append(_record(site, SKIPPED, reason))
            else:
                todo.append((site, row_axis))
        # data-free in graph order (the table beside the rest); with calibration statistics see _encoding_order
        order = _encoding_order(todo, self.plan) if self.plan.statistics else list(range(len(todo)))
        encodings: list[SiteEncoding | None] = [None] * len(todo)
        for index, site_encoding in zip(order, self._encode([todo[index] for index in order]), strict=True):
            encodings[index] = site_encoding
        for index, (site, row_axis) in enumerate(todo):
            site_encoding, encodings[index] = encodings[index], None  # its arrays live on in its decoder's tensors only
            pool = pools.setdefault(id(site.graph), ConstantPool(names))
            context = DecoderContext(names, pool, constants, self.config)
            written = site_encoding.encoding.write(site, row_axis, site_encoding, context)
            insertions += [_Insertion(site.graph, anchor_index(site) if part.at_node is None else part.at_node, site,
                                      part) for part in (written, *written.more)]
            records.append(self._record(site, site_encoding, written))
            del site_encoding
        functions = DecoderFunctions({t.name: t for pool in pools.values() for t in pool.initializers},
                                     default_opset(model), {f.name for f in model.functions if f.domain == DOMAIN})
        _apply(model.graph, insertions, pools, names, functions)
        functions.install(model)
        return PassResult(model, modified=bool(insertions), tensors=records)

    def _encode(self, items: list[tuple[WeightSite, int]]) -> list[SiteEncoding]:
        """The sites' encodings, in order: on threads of this process, or as jobs on the config's worker processes
        or Ray cluster (:mod:`jlcm_onnx.workers`; a weight already encoded by the sequential calibration is taken
        here)."""
        workers = Workers(self.config.workers, self.config.ray_address)
        if workers == Workers():
            return map_on_cores(self._encode_site, items, description="encoding", weight=lambda s: s[0].num_elements,
                                progress=self.progress, postfix=_describe)
        jobs = [encode_job(site, row_axis, self.config, self.plan) for site, row_axis in items
                if site.name not in self.plan.encodings]
        done = iter(map_jobs(EncodeJob.run, jobs, workers, description="encoding", name=lambda job: f"weight "
                             f"'{job.name}'", weight=lambda job: job.num_elements, progress=self.progress,
                             postfix=_describe, portable=EncodeJob.with_values))
        self.plan.statistics.clear()
        return [encode_site(site, row_axis, self.config, self.plan) if site.name in self.plan.encodings
                else next(done) for site, row_axis in items]

    def _encode_site(self, item: tuple[WeightSite, int]) -> SiteEncoding:
        """Encodes one site; its statistics are released once it is encoded (a Gram shared by several weights when
        the last of them is), and the memory its encoding freed goes back to the system
        (:func:`~jlcm_onnx.memory_budget.release_freed_memory`)."""
        site, row_axis = item
        try:
            return encode_site(site, row_axis, self.config, self.plan)
        finally:
            self.plan.statistics.pop(site.name, None)
            release_freed_memory()

    def _record(self, site: WeightSite, site_encoding: SiteEncoding, written: WrittenDecoder) -> TensorRecord:
        grouping = self.plan.groupings.get(site.name)
        return _record(site, COMPRESSED, compressed_bytes=written.decoder.stored_bytes,
                       row_order=grouping.note if grouping is not None else None, sqnr_db=site_encoding.sqnr_db,
                       layer_error=site_encoding.layer_error, **written.record)


def _describe(site_encoding: SiteEncoding) -> str:
    """The progress bar's note on an encoded weight: the layer error its learning reached."""
    error = site_encoding.layer_error
    return "" if error is None else f"layer error {error:.4f}"


def _apply(
    root: onnx.GraphProto, insertions: list[_Insertion], pools: dict[int, ConstantPool], names: NameAllocator,
    functions: DecoderFunctions,
) -> None:
    """Edits each graph: drops the dense weights and inserts the decoders in topological order, each one call of a
    decoder function where it has a kind; shared constants no node reads any more are dropped.

    Nested graphs are edited before the graphs that contain them: rewriting a graph's node list replaces its nodes by
    copies, and a body edited after that would be a detached copy.
    """
    by_graph: dict[int, list[_Insertion]] = defaultdict(list)
    for insertion in insertions:
        by_graph[id(insertion.graph)].append(insertion)
    innermost_first = reversed([g for g in iter_graphs(root) if id(g) in by_graph])
    for graph in innermost_first:
        group = by_graph[id(graph)]
        removed_constants = {i.site.name for i in group if i.site.constant_node is not None}
        replaced_nodes = {i.before_node for i in group if i.written.replaces_node} | {
            position for i in group for position in i.written.drops}
        removed_tensors = {i.site.name for i in group if i.site.constant_node is None}
        before: dict[int, list[_Insertion]] = defaultdict(list)
        for insertion in group:
            before[insertion.before_node].append(insertion)
        nodes: list[onnx.NodeProto] = []
        for position, node in enumerate(graph.node):
            for insertion in before.get(position, []):
                nodes.extend(_decoder_nodes(insertion, names, functions, node if insertion.written.replaces_node
                                            else None))
                graph.initializer.extend(insertion.written.decoder.initializers)
                del insertion.written.decoder.initializers[:]  # copied into the graph: the output is held once
            removed = node.op_type == "Constant" and node.output[0] in removed_constants
            if not removed and position not in replaced_nodes:
                nodes.append(node)
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes, strict=True):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
        read = {name for node in copies for name in node.input} | {
            name for node in copies for name in names_read_in_bodies(node)}
        graph.initializer.extend(t for t in pools[id(graph)].initializers if t.name in read)
        _remove_named(graph.initializer, removed_tensors)
        _remove_named(graph.input, removed_tensors)


def _decoder_nodes(insertion: _Insertion, names: NameAllocator, functions: DecoderFunctions,
                   replaced: onnx.NodeProto | None) -> list[onnx.NodeProto]:
    """The decoder, after the gate on its activation (its own, so that the call holds it): its nodes, or one call of
    its decoder function, which carries the metadata of the node it ``replaced`` (if any)."""
    written = insertion.written
    nodes = written.decoder.nodes
    if written.gate_activation is not None:
        gate, gate_nodes = build_gate(written.gate_activation, names)
        for node in nodes:
            node.input[:] = [gate if name == GATE_PLACEHOLDER else name for name in node.input]
        nodes = [*gate_nodes, *nodes]
    if written.function is not None:
        nodes = [functions.call(nodes, written.function, names.fresh(f"jlcm/decode/{insertion.site.name}"))]
    if replaced is not None:
        nodes[-1].metadata_props.extend(replaced.metadata_props)
    return nodes


def _remove_named(field, names: set[str]) -> None:  # noqa: ANN001 - a protobuf repeated field
    for index in reversed([i for i, item in enumerate(field) if item.name in names]):
        del field[index]


def _record(site: WeightSite, status: str, reason: str = "", **fields: object) -> TensorRecord:
    dtype = helper.tensor_dtype_to_np_dtype(site.tensor.data_type)
    return TensorRecord(
        name=site.name,
        consumers=tuple(c.describe() for c in site.consumers),
        layer=site.layer,
        shape=site.shape,
        dtype=helper.tensor_dtype_to_string(site.tensor.data_type).removeprefix("TensorProto."),
        original_bytes=site.num_elements * dtype.itemsize,
        status=status,
        reason=reason,
        **fields,
    )


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for g in iter_graphs(graph):
        names.update(v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer))
        for node in g.node:
            names.update((*node.input, *node.output, node.name))
    return names


def _initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for g in iter_graphs(graph) for t in g.initializer}
