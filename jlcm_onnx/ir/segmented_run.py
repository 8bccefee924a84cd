"""Running a model a segment of its nodes at a time, so that only one segment's weights are in memory.

An onnxruntime session holds every weight of its model: a 1.5B-parameter fp32 model is 6 GB in memory just to compute
the reference outputs of the output check. Here the main graph's nodes, in their (topological) file order, are cut into
consecutive *segments* whose initializers hold at most ``max_bytes`` together (a node reading more is a segment of its
own). Segment ``k`` is a model of its own:

- its nodes, and the initializers they read (an initializer read in two segments, such as an embedding table tied to
  the language-model head, is in both, and in memory for one at a time);
- as graph inputs, the values it reads that the graph inputs or earlier segments made, declared with the type and rank
  of the values they hold in this run;
- as graph outputs, the values it makes that later segments, the graph's outputs or the caller (the activations that
  calibration statistics read) want.

Segments run in order, each session created, run on every feed and dropped before the next (segment-major), and a
value is dropped once no later segment reads it; so the peak holds one segment's weights and, per feed, the
activations crossing its boundaries (for a decoder, the residual stream and the position tables: 0.1 GB for 64
sequences of 256 tokens at hidden size 1,536). With unoptimised sessions (the output check's reference) every node
computes what it computes in the whole model, so the outputs are the whole model's bit for bit; optimised ones
(calibration statistics) may fuse differently across a boundary. Large weights reach onnxruntime as
:func:`jlcm_onnx.ir.model_skeleton.session_with_weights` hands them over (those still in their file are read by
onnxruntime from it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from jlcm_onnx.ir.lazy_weights import tensor_array
from jlcm_onnx.ir.model_skeleton import model_with_graph, session_with_weights
from jlcm_onnx.ir.sessions import quiet_run
from jlcm_onnx.ir.tensor_size import stored_bytes
from jlcm_onnx.ir.weight_sites import names_read_in_bodies

#: Models whose weights exceed this many bytes run a segment of this size at a time where memory matters (the output
#: check's reference, calibration statistics); smaller ones run whole.
SEGMENT_BYTES = 256 << 20


@dataclass(frozen=True)
class Segment:
    """Nodes ``[start, stop)`` of the main graph, what they read from outside (``reads``: graph inputs and earlier
    segments' values) and what later segments or the graph outputs read of theirs (``makes``)."""

    start: int
    stop: int
    reads: tuple[str, ...]
    makes: tuple[str, ...]


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers."""
    return sum(stored_bytes(tensor) for tensor in model.graph.initializer)


def plan_segments(graph: onnx.GraphProto, max_bytes: int, wanted: Iterable[str] = ()) -> list[Segment]:
    """The graph's nodes cut into consecutive segments whose initializers hold at most ``max_bytes`` (see the module
    docstring); a segment makes the ``wanted`` values among its own (the graph outputs only where wanted: a language
    model's logits for 64 calibration sequences would be 17 GB) and those later segments read."""
    sizes = {tensor.name: stored_bytes(tensor) for tensor in graph.initializer}
    reads = [_names_read(node) for node in graph.node]
    cuts, held, current = [0], set(), 0
    for position, names in enumerate(reads):
        new = {name for name in names if name in sizes and name not in held}
        added = sum(sizes[name] for name in new)
        if held and added and current + added > max_bytes:
            cuts.append(position)
            new = {name for name in names if name in sizes}
            held, current = set(), sum(sizes[name] for name in new)
        else:
            current += added
        held |= new
    cuts.append(len(graph.node))
    return _segments(graph, reads, set(sizes), cuts, set(wanted))


def _segments(graph: onnx.GraphProto, reads: list[set[str]], stored: set[str], cuts: list[int],
              wanted: set[str]) -> list[Segment]:
    """The segments between ``cuts``, from the last back: each makes what is wanted of it or read by a node of a
    later segment that is itself needed, and reads from outside what its needed nodes read."""
    needed = set(wanted)
    segments = []
    for start, stop in reversed(list(zip(cuts, cuts[1:], strict=False))):
        made = {name for node in graph.node[start:stop] for name in node.output if name}
        makes = made & needed
        read: set[str] = set()
        live = set(makes)
        for position in reversed(range(start, stop)):  # the nodes the wanted values depend on
            if live.intersection(graph.node[position].output):
                live |= reads[position]
                read |= reads[position] - stored
        segments.append(Segment(start, stop, tuple(sorted(read - made)), tuple(sorted(makes))))
        needed |= read
    return segments[::-1]


def run_in_segments(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], max_bytes: int,
    options: Callable[[], ort.SessionOptions], providers: list[str],
) -> list[np.ndarray]:
    """The graph outputs of ``model`` on ``feed``, computed a segment at a time (``options`` makes each segment's
    session options). Raises what onnxruntime raises when a segment fails to load or run, and ``TypeError`` when a
    value crossing a boundary is not a tensor (a sequence or a map)."""
    names = [value.name for value in model.graph.output]
    found: dict[str, np.ndarray] = {}
    for _, values in segment_values(model, [feed], names, max_bytes, options, providers):
        found.update(values)
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    return [found[name] if name in found else tensor_array(stored[name]) for name in names]


def segment_values(
    model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], wanted: Iterable[str], max_bytes: int,
    options: Callable[[], ort.SessionOptions], providers: list[str],
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Runs ``model`` on every feed a segment at a time, segment-major: each segment's session is made once and runs
    every feed in turn (the values crossing its boundaries kept per feed), then dropped. Yields, for each segment and
    feed in that order, ``(feed index, {name: value})`` of the ``wanted`` values that segment made (those that are
    graph inputs with the first segment); initializers are never yielded. A segment's graph inputs are declared with
    the rank and type of the first feed's values, their sizes left free."""
    wanted = set(wanted)
    segments = plan_segments(model.graph, max_bytes, wanted)
    carried = [dict(feed) for feed in feeds]
    for position, segment in enumerate(segments):
        session = arrays = names = None
        later = {name for following in segments[position + 1:] for name in following.reads}
        for index, values in enumerate(carried):
            made: dict[str, np.ndarray] = {}
            if segment.makes:  # else nothing of it is wanted: it is not run
                inputs = {name: values[name] for name in segment.reads if name in values}
                if session is None:  # its nodes that make nothing wanted are left out, with their weights
                    part = _segment_model(model, segment, inputs)
                    session, arrays = session_with_weights(part, options(), providers, list(part.graph.output))
                    names = [value.name for value in part.graph.output]
                made = dict(zip(names, session.run(names, inputs, quiet_run()), strict=True))
            found = {name: value for name, value in (*made.items(), *(values.items() if position == 0 else ()))
                     if name in wanted}
            carried[index] = {name: value for name, value in {**values, **made}.items() if name in later}
            del made, values  # a wanted value is kept per feed only when a later segment reads it
            yield index, found
        del session, arrays


def _segment_model(model: onnx.ModelProto, segment: Segment, inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Segment ``segment`` of ``model`` as a model of its own, its graph inputs typed by the values they hold."""
    graph = model.graph
    part = onnx.GraphProto(name=graph.name)
    part.node.extend(graph.node[segment.start:segment.stop])
    read = set().union(*(_names_read(node) for node in part.node))
    part.initializer.extend(tensor for tensor in graph.initializer if tensor.name in read)
    part.sparse_initializer.extend(tensor for tensor in graph.sparse_initializer if tensor.values.name in read)
    for name, value in inputs.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(f"value '{name}' crossing a segment boundary is a {type(value).__name__}, not a tensor")
        part.input.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), [None] * value.ndim))
    part.output.extend(onnx.ValueInfoProto(name=name) for name in segment.makes)
    return model_with_graph(model, part)


def _names_read(node: onnx.NodeProto) -> set[str]:
    return {name for name in node.input if name} | names_read_in_bodies(node)
