"""Running a model a segment of its nodes at a time gives the whole model's outputs, bit for bit, holding one
segment's weights at once; the output check uses it for models above its segment size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from jlcm_onnx.errors import ModelError
from jlcm_onnx.ir import lazy_weights, output_check
from jlcm_onnx.ir.model_load import load_model
from jlcm_onnx.ir.segmented_run import plan_segments, run_in_segments
from jlcm_onnx.ir.sessions import session_options
from jlcm_onnx.ir.tensor_size import stored_bytes
from jlcm_onnx.ir.weight_sites import names_read_in_bodies

from conftest import make_model, run, tensor, value

CPU = ["CPUExecutionProvider"]
HIDDEN, VOCAB, LAYERS = 32, 64, 4
STATES = ["batch", "seq", HIDDEN]


def tied_decoder(rng: np.random.Generator) -> onnx.ModelProto:
    """ids -> Gather(table) -> LAYERS x (MatMul, Tanh, Add residual) -> MatMul(table^T) -> logits; an If node whose
    branches read an outer-scope value and an initializer; the table also a graph output."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h0"])]
    initializers = [tensor("table", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32))]
    for layer in range(LAYERS):
        initializers.append(tensor(f"w{layer}", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 6))
        nodes += [helper.make_node("MatMul", [f"h{layer}", f"w{layer}"], [f"m{layer}"]),
                  helper.make_node("Tanh", [f"m{layer}"], [f"t{layer}"]),
                  helper.make_node("Add", [f"h{layer}", f"t{layer}"], [f"h{layer + 1}"])]
    last = f"h{LAYERS}"
    initializers.append(tensor("bias", rng.standard_normal(HIDDEN).astype(np.float32)))
    branch = [helper.make_graph([helper.make_node(op, [last, "bias"], [f"{op}_out"])], op, [],
                                [value(f"{op}_out", TensorProto.FLOAT, STATES)]) for op in ("Add", "Sub")]
    nodes += [helper.make_node("ReduceSum", [last], ["total"], keepdims=0),
              helper.make_node("Greater", ["total", "zero"], ["positive"]),
              helper.make_node("If", ["positive"], ["branched"], then_branch=branch[0], else_branch=branch[1]),
              helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
              helper.make_node("MatMul", ["branched", "table_t"], ["logits"])]
    initializers.append(tensor("zero", np.zeros((), np.float32)))
    return make_model(nodes, [value("ids", TensorProto.INT64, ["batch", "seq"])],
                      [value("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB]),
                       value("table", TensorProto.FLOAT, [VOCAB, HIDDEN]), value(last, TensorProto.FLOAT, STATES)],
                      initializers)


def options() -> ort.SessionOptions:
    return session_options(optimize=False, arena=False, prepack=False)


@pytest.mark.parametrize("max_bytes", [1, 5000, 9000, 1 << 30])
def test_segments_give_the_whole_models_outputs_bit_for_bit(rng: np.random.Generator, max_bytes: int) -> None:
    model = tied_decoder(rng)
    feed = {"ids": rng.integers(0, VOCAB, (2, 5))}
    whole = run(model, feed)
    segmented = run_in_segments(model, feed, max_bytes, options, CPU)
    assert len(segmented) == len(whole)
    for want, got in zip(whole, segmented, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("max_bytes", [1, 5000, 9000, 1 << 30])
def test_each_segment_holds_at_most_its_bytes_of_weights_unless_one_node_reads_more(
        rng: np.random.Generator, max_bytes: int) -> None:
    graph = tied_decoder(rng).graph
    sizes = {t.name: stored_bytes(t) for t in graph.initializer}
    segments = plan_segments(graph, max_bytes)
    assert [s.start for s in segments] == [0] + [s.stop for s in segments[:-1]]
    assert segments[-1].stop == len(graph.node)
    for segment in segments:
        nodes = graph.node[segment.start:segment.stop]
        held = sum(sizes[name] for name in set().union(*map(reads, nodes)) if name in sizes)
        weight_readers = [node for node in nodes if reads(node) & sizes.keys()]
        assert held <= max_bytes or len(weight_readers) == 1
    if max_bytes >= sum(sizes.values()):
        assert len(segments) == 1
    elif max_bytes == 1:
        assert len(segments) == sum(bool(reads(node) & sizes.keys()) for node in graph.node)


def reads(node: onnx.NodeProto) -> set[str]:
    return set(node.input) | names_read_in_bodies(node)


def test_a_sequence_crossing_a_boundary_is_refused_by_name(rng: np.random.Generator) -> None:
    weight = tensor("w", rng.standard_normal((4, 4)).astype(np.float32))
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("SequenceConstruct", ["y"], ["seq"]),
         helper.make_node("SequenceAt", ["seq", "index"], ["at"]), helper.make_node("MatMul", ["at", "w2"], ["z"])],
        [value("x", TensorProto.FLOAT, [1, 4])], [value("z", TensorProto.FLOAT, [1, 4])],
        [weight, tensor("index", np.array(0, np.int64)), tensor("w2", np.eye(4, dtype=np.float32))])
    with pytest.raises(TypeError, match="'seq'"):
        run_in_segments(model, {"x": np.ones((1, 4), np.float32)}, 1, options, CPU)


@pytest.mark.parametrize("external", [False, True])
def test_the_output_check_reference_is_the_same_in_segments(rng: np.random.Generator, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, external: bool) -> None:
    monkeypatch.setattr(lazy_weights, "LAZY_MIN_BYTES", 1024)  # the weights stay in their file (embedded or not)
    path = tmp_path / "tied.onnx"
    onnx.save(tied_decoder(rng), path, save_as_external_data=external, size_threshold=0)
    assert all(lazy_weights.is_lazy(t) for t in load_model(path)[0].graph.initializer if stored_bytes(t) >= 1024)
    whole = output_check.reference_for(load_model(path)[0], path=path)
    monkeypatch.setattr(output_check, "SEGMENT_BYTES", 4000)
    segmented = output_check.reference_for(load_model(path)[0], path=path)
    assert not whole.skipped and not segmented.skipped
    assert segmented.output_names == whole.output_names
    for want, got in zip(whole.outputs, segmented.outputs, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_model_onnxruntime_cannot_load_is_refused_before_any_segment_runs(
        rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tied_decoder(rng)
    model.graph.node.append(helper.make_node("NoSuchOp", ["logits"], ["extra"], domain="com.example"))
    model.graph.output.append(value("extra", TensorProto.FLOAT, None))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    monkeypatch.setattr(output_check, "SEGMENT_BYTES", 4000)
    with pytest.raises(ModelError, match="cannot load the input model"):
        output_check.reference_for(model)


def test_the_spot_check_of_a_large_output_runs_in_segments_and_still_catches_a_broken_output(
        rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tied_decoder(rng)
    reference = output_check.reference_for(model)
    calls = []
    monkeypatch.setattr(output_check, "SEGMENT_BYTES", 4000)
    monkeypatch.setattr(output_check, "COMPRESSED_SEGMENT_BYTES", 500)
    monkeypatch.setattr(output_check, "run_in_segments", lambda *args: calls.append(args) or run_in_segments(*args))
    assert output_check.check_output(model, reference) is None
    assert [call[2] for call in calls] == [500]  # smaller segments: a compressed segment decodes to more bytes
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    weight = next(t for t in broken.graph.initializer if t.name == "w2")
    weight.CopyFrom(tensor("w2", np.full((HIDDEN, HIDDEN), np.inf, np.float32)))
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        output_check.check_output(broken, reference)


def test_a_model_above_the_segment_size_compresses_to_the_same_bytes_and_says_so(
        rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    import jlcm_onnx
    from jlcm_onnx.pipeline import compress as compress_module

    model = tied_decoder(rng)
    config = jlcm_onnx.CompressionConfig(bits=3, min_elements=256)
    whole = jlcm_onnx.compress(model, config)
    assert not any(note.startswith("memory:") for note in whole.report.notes)
    for module in (output_check, compress_module):
        monkeypatch.setattr(module, "SEGMENT_BYTES", 4000)
    monkeypatch.setattr(output_check, "COMPRESSED_SEGMENT_BYTES", 500)
    segmented = jlcm_onnx.compress(model, config)
    assert segmented.model.SerializeToString() == whole.model.SerializeToString()
    assert any(note.startswith("memory:") and "a segment of at most 4.00 KB" in note
               for note in segmented.report.notes), segmented.report.notes


def test_values_nobody_wants_are_never_computed(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Collecting a layer's input must not compute (and keep, per batch) the logits after it: a language model's
    logits for 64 calibration sequences are gigabytes. The head's segment is then not run at all."""
    from jlcm_onnx.ir import segmented_run

    model = tied_decoder(rng)
    feeds = [{"ids": rng.integers(0, VOCAB, (2, 5))} for _ in range(3)]
    sessions = []
    original = segmented_run.session_with_weights
    monkeypatch.setattr(segmented_run, "session_with_weights",
                        lambda part, *args: sessions.append(part) or original(part, *args))
    found = list(segmented_run.segment_values(model, feeds, ["h2"], 1, options, CPU))
    made = {name for part in sessions for node in part.graph.node for name in node.output}
    assert "logits" not in made and "h3" not in made
    assert [index for index, values in found if "h2" in values] == [0, 1, 2]
    np.testing.assert_array_equal(next(v["h2"] for i, v in found if "h2" in v), run_to(model, feeds[0], "h2"))


def run_to(model: onnx.ModelProto, feed: dict[str, np.ndarray], name: str) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(value(name, TensorProto.FLOAT, STATES))
    return run(probe, feed)[-1]
