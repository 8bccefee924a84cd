"""Calibration statistics collected in onnxruntime: Grams equal to those computed from the known inputs."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.analysis import activation_inputs as activation_inputs_module
from jlcm_onnx.analysis import statistics
from jlcm_onnx.analysis.activation_inputs import activation_inputs
from jlcm_onnx.analysis.statistics import collect_statistics

from conftest import FLOAT, INT64, correlated_inputs, make_model, matmul_model, run, tensor, value


def gram(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows.T @ rows


def assert_gram_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal within the documented precision: products in float32, so each entry within 1e-6 of its Cauchy-Schwarz
    scale ``sqrt(H_ii H_jj)``."""
    diagonal = np.sqrt(np.abs(np.diagonal(expected, axis1=-2, axis2=-1)))
    scale = diagonal[..., :, None] * diagonal[..., None, :]
    assert actual.shape == expected.shape
    assert np.all(np.abs(actual - expected) <= 1e-6 * scale + 1e-12), np.max(np.abs(actual - expected) / scale)


def test_matmul_gram_over_all_leading_axes(rng):
    weight = rng.standard_normal((6, 5)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [value("X", FLOAT, ["B", "S", 6])],
        [value("Y", FLOAT, ["B", "S", 5])],
        [tensor("W", weight)],
    )
    batches = [rng.standard_normal((2, 3, 6)).astype(np.float32), rng.standard_normal((4, 7, 6)).astype(np.float32)]
    stats = collect_statistics(model, ["W"], [{"X": x} for x in batches])["W"]
    rows = np.concatenate([x.reshape(-1, 6) for x in batches])
    assert stats.gram.shape == (6, 6)
    assert_gram_close(stats.gram, gram(rows))
    assert stats.count == 2 * 3 + 4 * 7
    np.testing.assert_allclose(stats.mean_square, (rows.astype(np.float64) ** 2).mean(axis=0), rtol=1e-6)
    assert stats.token_counts is None and stats.note == ""
    # The objective identity of the module docstring: ||dW X||^2 = tr(dW H dW^T) with dW in the encoder's layout.
    delta = rng.standard_normal(weight.shape)
    matrix = np.moveaxis(delta, 1, 0).reshape(5, -1)
    np.testing.assert_allclose(((rows @ delta) ** 2).sum(), np.trace(matrix @ stats.gram @ matrix.T), rtol=1e-5)


def test_gemm_transposed_weight_and_input(rng):
    weight = rng.standard_normal((5, 6)).astype(np.float32)  # transB=1: [out, in], cols = in
    model = make_model(
        [helper.make_node("Gemm", ["A", "W"], ["Y"], transA=1, transB=1, alpha=2.0)],
        [value("A", FLOAT, [6, "M"])],
        [value("Y", FLOAT, ["M", 5])],
        [tensor("W", weight)],
    )
    a = rng.standard_normal((6, 9)).astype(np.float32)
    stats = collect_statistics(model, ["W"], [{"A": a}])["W"]
    assert_gram_close(stats.gram, gram(a.T))
    assert stats.count == 9


def conv_model(weight: np.ndarray, channels: int, **attributes) -> object:
    return make_model(
        [helper.make_node("Conv", ["X", "W"], ["Y"], **attributes)],
        [value("X", FLOAT, ["N", channels, "H", "W"])],
        [value("Y", FLOAT, [None] * 4)],
        [tensor("W", weight)],
    )


def test_conv_gram_matches_torch_unfold(rng):
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = conv_model(weight, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    stats = collect_statistics(model, ["W"], [{"X": x}])["W"]
    columns = torch.nn.functional.unfold(torch.from_numpy(x), (3, 3), padding=1, stride=2)  # [N, C*9, L]
    columns = columns.transpose(1, 2).reshape(-1, 27).numpy()
    assert stats.gram.shape == (27, 27)
    assert_gram_close(stats.gram, gram(columns))
    assert stats.count == 2 * 5 * 4
    # The layer output is W_mat @ x per position: the columns reproduce the conv.
    output = columns @ weight.reshape(4, -1).T
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), stride=2, padding=1)
    np.testing.assert_allclose(output, expected.permute(0, 2, 3, 1).reshape(-1, 4).numpy(), rtol=1e-4, atol=1e-4)


def test_conv_dilation(rng):
    weight = rng.standard_normal((2, 2, 3, 2)).astype(np.float32)
    model = conv_model(weight, 2, dilations=[2, 1], pads=[2, 0, 1, 1])
    x = rng.standard_normal((1, 2, 7, 6)).astype(np.float32)
    stats = collect_statistics(model, ["W"], [{"X": x}])["W"]
    padded = np.pad(x, [(0, 0), (0, 0), (2, 1), (0, 1)])
    columns = torch.nn.functional.unfold(torch.from_numpy(padded), (3, 2), dilation=(2, 1))
    columns = columns.transpose(1, 2).reshape(-1, 12).numpy()
    assert stats.count == 6 * 6
    assert_gram_close(stats.gram, gram(columns))


@pytest.mark.parametrize(("auto_pad", "width_pads"), [("SAME_UPPER", (0, 1)), ("SAME_LOWER", (1, 0))])
def test_conv_auto_pad(rng, auto_pad, width_pads):
    weight = rng.standard_normal((2, 2, 3, 2)).astype(np.float32)
    model = conv_model(weight, 2, strides=[2, 1], auto_pad=auto_pad)
    x = rng.standard_normal((1, 2, 7, 6)).astype(np.float32)
    stats = collect_statistics(model, ["W"], [{"X": x}])["W"]
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), width_pads])  # odd total padding: the extra one at the end (UPPER)
    columns = torch.nn.functional.unfold(torch.from_numpy(padded), (3, 2), stride=(2, 1))
    columns = columns.transpose(1, 2).reshape(-1, 12).numpy()
    assert stats.count == 4 * 6
    assert_gram_close(stats.gram, gram(columns))


def test_depthwise_conv_one_gram_per_group(rng):
    channels = 4
    weight = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    model = conv_model(weight, channels, group=channels, pads=[1, 1, 1, 1])
    x = rng.standard_normal((3, channels, 5, 5)).astype(np.float32)
    stats = collect_statistics(model, ["W"], [{"X": x}])["W"]
    assert stats.gram.shape == (channels, 9, 9) and stats.conv_groups == channels
    columns = torch.nn.functional.unfold(torch.from_numpy(x), (3, 3), padding=1).transpose(1, 2).numpy()
    for group in range(channels):
        assert_gram_close(stats.gram[group], gram(columns[:, :, group * 9:(group + 1) * 9].reshape(-1, 9)))
    assert stats.count == 3 * 25
    assert stats.mean_square.shape == (channels, 9)


def test_gather_token_counts():
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    model = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["Y"])],
        [value("ids", INT64, ["B", "S"])],
        [value("Y", FLOAT, ["B", "S", 4])],
        [tensor("E", table)],
    )
    feeds = [{"ids": np.array([[1, 2, 2], [9, -1, 0]])}, {"ids": np.array([[2, 3]])}]
    stats = collect_statistics(model, ["E"], feeds)["E"]
    assert stats.gram is None
    np.testing.assert_array_equal(stats.token_counts, [1, 1, 3, 1, 0, 0, 0, 0, 0, 2])
    assert stats.count == 8


def tied_head_model(table: np.ndarray) -> object:
    """A language model's two ends: embedding lookup ``E[ids]``, then logits ``H @ E^T`` through a Transpose."""
    rows, cols = table.shape
    return make_model(
        [helper.make_node("Gather", ["E", "ids"], ["emb"]), helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
         helper.make_node("Add", ["emb", "H"], ["hidden"]), helper.make_node("MatMul", ["hidden", "Et"], ["logits"])],
        [value("ids", INT64, ["B", "S"]), value("H", FLOAT, ["B", "S", cols])],
        [value("logits", FLOAT, ["B", "S", rows])],
        [tensor("E", table)],
    )


def test_tied_head_gets_the_gram_of_its_input_and_the_token_counts(rng):
    """``MatMul(h, Transpose(E))`` reads E with its rows as outputs: E gets the Gram of h beside the lookup counts."""
    table = rng.standard_normal((10, 4)).astype(np.float32)
    ids = np.array([[1, 2, 2]])
    h = rng.standard_normal((1, 3, 4)).astype(np.float32)
    stats = collect_statistics(tied_head_model(table), ["E"], [{"ids": ids, "H": h}])["E"]
    assert_gram_close(stats.gram, gram((table[ids] + h).reshape(-1, 4)))
    np.testing.assert_array_equal(stats.token_counts, [0, 1, 2] + [0] * 7)


def test_calibration_fits_a_tied_head_to_its_logits():
    """With the head's Gram, the shared table is learned for the logits: on held-out hidden states of the same
    distribution the logits error is lower than data-free at the same size, and the lookups stay exact-shaped."""
    table = np.random.default_rng(1).standard_normal((96, 64)).astype(np.float32)
    model = tied_head_model(table)
    config = CompressionConfig(bits=3, groups=4, outlier_fraction=0.0, min_elements=1)
    ids = np.zeros((1, 1), np.int64)
    calibration = [{"ids": ids, "H": row[None, None, :]} for row in correlated_inputs(256, 64, seed=2)]
    held_out = {"ids": np.zeros((1, 512), np.int64), "H": correlated_inputs(512, 64, seed=3)[None]}
    expected = run(model, held_out)[0]

    def error(result: jlcm_onnx.CompressionResult) -> float:
        return float(np.square(run(result.model, held_out)[0] - expected).sum() / np.square(expected).sum())

    learned = jlcm_onnx.compress(model, config, calibration=calibration)
    data_free = jlcm_onnx.compress(model, config)
    assert learned.report.compressed[0].compressed_bytes == data_free.report.compressed[0].compressed_bytes
    assert error(learned) < 0.7 * error(data_free)


def test_transposed_table_read_as_the_left_factor_is_not_a_head(rng):
    table = rng.standard_normal((10, 4)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["emb"]), helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
         helper.make_node("MatMul", ["Et", "X"], ["Y"])],
        [value("ids", INT64, ["S"]), value("X", FLOAT, [10, 2])],
        [value("emb", FLOAT, ["S", 4]), value("Y", FLOAT, [4, 2])],
        [tensor("E", table)],
    )
    stats = collect_statistics(model, ["E"], [{"ids": np.array([1]), "X": np.ones((10, 2), np.float32)}])["E"]
    assert stats.gram is None


def shared_input_model(rng) -> object:
    return make_model(
        [
            helper.make_node("Relu", ["X"], ["R"]),
            helper.make_node("MatMul", ["R", "Q"], ["YQ"]),
            helper.make_node("MatMul", ["R", "K"], ["YK"]),
            helper.make_node("MatMul", ["YQ", "O"], ["Y"]),
        ],
        [value("X", FLOAT, ["N", 8])],
        [value("Y", FLOAT, ["N", 3]), value("YK", FLOAT, ["N", 4])],
        [tensor(name, rng.standard_normal(shape).astype(np.float32)) for name, shape in
         [("Q", (8, 4)), ("K", (8, 4)), ("O", (4, 3))]],
    )


def test_shared_input_gram_computed_once(rng, monkeypatch):
    model = shared_input_model(rng)
    calls = []
    original = activation_inputs_module.RowInput.reduce
    monkeypatch.setattr(activation_inputs_module.RowInput, "reduce",
                        lambda self, a, real=None: calls.append(self.tensor) or original(self, a, real))
    x = rng.standard_normal((5, 8)).astype(np.float32)
    stats = collect_statistics(model, ["Q", "K", "O"], [{"X": x}])
    assert sorted(calls) == ["R", "YQ"]
    assert stats["Q"].gram is stats["K"].gram and not stats["Q"].gram.flags.writeable
    assert_gram_close(stats["Q"].gram, gram(np.maximum(x, 0)))
    q = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(stats["O"].gram, gram(np.maximum(x, 0) @ q), rtol=1e-5)


def test_weight_with_two_consumers_sums_them(rng):
    weight = rng.standard_normal((3, 2)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y1"]), helper.make_node("MatMul", ["Z", "W"], ["Y2"])],
        [value("X", FLOAT, ["N", 3]), value("Z", FLOAT, ["N", 3])],
        [value("Y1", FLOAT, ["N", 2]), value("Y2", FLOAT, ["N", 2])],
        [tensor("W", weight)],
    )
    x, z = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    stats = collect_statistics(model, ["W"], [{"X": x, "Z": z}])["W"]
    assert_gram_close(stats.gram, gram(x) + gram(z))
    assert stats.count == 10


def test_feeds_are_streamed_not_kept(rng, monkeypatch):
    """A generator is read one batch at a time, and no batch's activations outlive its reduction."""

    model = matmul_model(rng.standard_normal((16, 4)).astype(np.float32))
    seen: list[weakref.ref] = []
    alive_when_drawn = []

    def batches():
        for _ in range(5):
            alive_when_drawn.append(sum(ref() is not None for ref in seen))
            yield {"X": rng.standard_normal((32, 16)).astype(np.float32)}

    original = activation_inputs_module.RowInput.reduce

    def reduce(self, activation, real=None):
        seen.append(weakref.ref(activation))
        return original(self, activation, real)

    monkeypatch.setattr(activation_inputs_module.RowInput, "reduce", reduce)
    stats = collect_statistics(model, ["W"], batches(), progress=True)["W"]
    assert stats.count == 5 * 32 and len(seen) == 5
    assert alive_when_drawn == [0] * 5  # every earlier batch's activation was freed before the next was drawn


def test_deterministic(rng):
    model = shared_input_model(rng)
    feeds = [{"X": rng.standard_normal((7, 8)).astype(np.float32)} for _ in range(3)]
    first = collect_statistics(model, ["Q", "O"], feeds)
    second = collect_statistics(model, ["Q", "O"], feeds)
    for name in ("Q", "O"):
        np.testing.assert_array_equal(first[name].gram, second[name].gram)


def test_sequential_mode_uses_activations_of_the_original(rng):
    """Once W is no longer an initializer, its activation keys from the original model still find its input."""
    model = shared_input_model(rng)
    keys = activation_inputs(model, ["Q"])
    compressed = shared_input_model(rng)
    index = [t.name for t in compressed.graph.initializer].index("Q")
    q = compressed.graph.initializer.pop(index)
    compressed.graph.node.insert(0, helper.make_node("Identity", ["Qc"], ["Q"]))  # stands in for a decode subgraph
    compressed.graph.initializer.append(tensor("Qc", np.zeros(tuple(q.dims), np.float32)))
    x = rng.standard_normal((5, 8)).astype(np.float32)
    assert not collect_statistics(compressed, ["Q"], [{"X": x}])["Q"].available
    stats = collect_statistics(compressed, ["Q"], [{"X": x}], inputs=keys)["Q"]
    assert_gram_close(stats.gram, gram(np.maximum(x, 0)))


def test_reasons_for_weights_without_statistics(rng):
    weight = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    model = make_model(
        [helper.make_node("ConvTranspose", ["X", "W"], ["Y"]), helper.make_node("Add", ["Y", "B"], ["Z"])],
        [value("X", FLOAT, [1, 3, 4, 4])],
        [value("Z", FLOAT, [1, 2, 6, 6])],
        [tensor("W", weight), tensor("B", np.ones((1, 2, 1, 1), np.float32))],
    )
    stats = collect_statistics(model, ["W", "B", "missing"], [{"X": np.ones((1, 3, 4, 4), np.float32)}])
    assert "ConvTranspose" in stats["W"].note and stats["W"].gram is None
    assert "no MatMul" in stats["B"].note
    assert "not a float weight" in stats["missing"].note


def test_weight_inside_subgraph_has_a_reason(rng):
    body = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Wb"], ["Yb"])], "body", [], [value("Yb", FLOAT, [3, 2])],
        [tensor("Wb", rng.standard_normal((4, 2)).astype(np.float32))],
    )
    model = make_model(
        [helper.make_node("If", ["C"], ["Y"], then_branch=body, else_branch=body)],
        [value("C", TensorProto.BOOL, []), value("X", FLOAT, [3, 4])],
        [value("Y", FLOAT, [3, 2])],
    )
    stats = collect_statistics(model, ["Wb"], [])
    assert "If/Loop/Scan" in stats["Wb"].note



@pytest.mark.parametrize("groups", [1, 2])
def test_conv1d(rng, groups):
    weight = rng.standard_normal((4, 4 // groups, 3)).astype(np.float32)
    model = make_model(
        [helper.make_node("Conv", ["X", "W"], ["Y"], group=groups, pads=[1, 0])],
        [value("X", FLOAT, ["N", 4, "L"])],
        [value("Y", FLOAT, [None] * 3)],
        [tensor("W", weight)],
    )
    x = rng.standard_normal((2, 4, 6)).astype(np.float32)
    stats = collect_statistics(model, ["W"], [{"X": x}])["W"]
    padded = torch.from_numpy(np.pad(x, [(0, 0), (0, 0), (1, 0)]))[:, :, None]
    columns = torch.nn.functional.unfold(padded, (1, 3)).transpose(1, 2).reshape(-1, 4, 3).numpy()
    cols = 4 // groups
    grams = [gram(columns[:, g * cols:(g + 1) * cols].reshape(-1, cols * 3)) for g in range(groups)]
    expected = grams[0] if groups == 1 else np.stack(grams)
    assert_gram_close(stats.gram, expected)


def test_batches_hold_a_bounded_amount_of_activations(monkeypatch):
    """``Y = X @ W`` with X [N, seq, 64]: a sample of seq 100 returns 100 * 64 * 4 bytes of X; the batch is as many
    samples as fit the byte bound, at least one and at most MAX_BATCH."""
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [value("X", FLOAT, ["N", "seq", 64])],
                       [value("Y", FLOAT, ["N", "seq", 32])], [tensor("W", np.ones((64, 32), np.float32))])
    sample = {"X": np.zeros((1, 100, 64), np.float32)}
    assert statistics.activation_bytes(model, {"X"}, sample) == 100 * 64 * 4
    assert statistics.batch_size(model, ["W"], sample) == statistics.MAX_BATCH
    monkeypatch.setattr(statistics, "BATCH_ACTIVATION_BYTES", 3 * 100 * 64 * 4 + 1)
    assert statistics.batch_size(model, ["W"], sample) == 3
    monkeypatch.setattr(statistics, "BATCH_ACTIVATION_BYTES", 10)
    assert statistics.batch_size(model, ["W"], sample) == 1


def masked_model(rng: np.random.Generator) -> tuple:
    """X [B, S, 6] @ W, Gather(E, ids [B, S]) and the attention mask [B, S] (read by an Identity)."""
    weight, table = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((20, 4)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"]), helper.make_node("Gather", ["E", "ids"], ["Z"]),
         helper.make_node("Identity", ["attention_mask"], ["M"])],
        [value("X", FLOAT, ["B", "S", 6]), value("ids", INT64, ["B", "S"]), value("attention_mask", INT64, ["B", "S"])],
        [value("Y", FLOAT, ["B", "S", 5]), value("Z", FLOAT, ["B", "S", 4]), value("M", INT64, ["B", "S"])],
        [tensor("W", weight), tensor("E", table)],
    )
    return model


def padded(feed: dict[str, np.ndarray], length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``feed`` padded on the right to ``length`` positions with random values and a zero mask there."""
    batch, real = feed["ids"].shape
    extra = length - real
    return {
        "X": np.concatenate([feed["X"], 100 * rng.standard_normal((batch, extra, 6)).astype(np.float32)], axis=1),
        "ids": np.concatenate([feed["ids"], rng.integers(0, 20, (batch, extra))], axis=1),
        "attention_mask": np.concatenate([feed["attention_mask"], np.zeros((batch, extra), np.int64)], axis=1),
    }


def test_padded_positions_change_nothing(rng):
    """A batch and its copy padded to a longer sequence (garbage under a zero mask) give the same statistics."""
    model = masked_model(rng)
    feed = {"X": rng.standard_normal((3, 5, 6)).astype(np.float32), "ids": rng.integers(0, 20, (3, 5)),
            "attention_mask": np.ones((3, 5), np.int64)}
    long = padded(feed, 16, rng)
    plain = collect_statistics(model, ["W", "E"], [feed], mask="attention_mask")
    masked = collect_statistics(model, ["W", "E"], [long], mask="attention_mask")
    assert_gram_close(masked["W"].gram, plain["W"].gram)
    assert masked["W"].count == plain["W"].count == 15
    np.testing.assert_array_equal(masked["E"].token_counts, plain["E"].token_counts)
    unmasked = collect_statistics(model, ["W", "E"], [long])
    assert unmasked["W"].count == 48 and not np.allclose(unmasked["W"].gram, plain["W"].gram)


def test_calibration_finds_the_attention_mask_and_reports_padding(rng, tmp_path):
    model = masked_model(rng)
    feed = {"X": rng.standard_normal((8, 4, 6)).astype(np.float32), "ids": rng.integers(0, 20, (8, 4)),
            "attention_mask": np.ones((8, 4), np.int64)}
    long = padded(feed, 16, rng)  # 75% padding
    data = jlcm_onnx.load_calibration(long, model)
    assert data.mask == "attention_mask" and data.positions() == (32, 128)
    assert jlcm_onnx.load_calibration(long, model, mask=None).mask is None
    with pytest.raises(jlcm_onnx.CalibrationError, match="mask input 'X' is float32"):
        jlcm_onnx.load_calibration(long, model, mask="X")
    result = jlcm_onnx.compress(model, CompressionConfig(bits=2, min_elements=16), data)
    notes = result.report.notes
    assert "calibration: 32 of 128 positions used (96 padding positions of 'attention_mask' left out)" in notes
    assert any(n.startswith("warning: 75% of the calibration positions are padding") for n in notes)


def all_statistics(model, names, feeds, mask=None):
    stats = collect_statistics(model, names, feeds, mask=mask)
    return {name: (s.gram, s.count, s.token_counts) for name, s in stats.items()}


def assert_same_statistics(actual, expected, exact: bool) -> None:
    assert actual.keys() == expected.keys()
    for name, (gram_value, count, tokens) in expected.items():
        assert actual[name][1] == count
        np.testing.assert_array_equal(actual[name][2], tokens)
        if gram_value is None:
            assert actual[name][0] is None
        elif exact:
            np.testing.assert_array_equal(actual[name][0], gram_value)
        else:
            assert_gram_close(actual[name][0], gram_value)


@pytest.mark.parametrize("optimize", [False, True])
def test_a_model_above_the_segment_size_gives_the_same_statistics_a_segment_at_a_time(rng, monkeypatch, optimize):
    """Segment-major (each segment runs every batch, then is dropped) adds each sum's batches in the same order: the
    statistics of the whole-model run, exactly when the sessions are unoptimised (optimised ones may fuse
    differently across a boundary), with masks, shared Grams, a tied table and several batches."""
    monkeypatch.setattr(statistics, "session_options", lambda: jlcm_onnx.ir.sessions.session_options(
        optimize=optimize))
    table = rng.standard_normal((10, 4)).astype(np.float32)
    feeds = [{"ids": rng.integers(0, 10, (2, 3)), "H": rng.standard_normal((2, 3, 4)).astype(np.float32)}
             for _ in range(3)]
    shared = [{"X": rng.standard_normal((5, 8)).astype(np.float32)} for _ in range(3)]
    masked = [{"X": rng.standard_normal((2, 5, 6)).astype(np.float32), "ids": rng.integers(0, 20, (2, 5)),
               "attention_mask": rng.integers(0, 2, (2, 5))} for _ in range(2)]
    cases = [(tied_head_model(table), ["E"], feeds, None), (shared_input_model(rng), ["Q", "K", "O"], shared, None),
             (masked_model(rng), ["W", "E"], masked, "attention_mask")]
    for model, names, batches, mask in cases:
        whole = all_statistics(model, names, batches, mask)
        monkeypatch.setattr(statistics, "SEGMENT_BYTES", 64)
        monkeypatch.setattr(statistics, "SPILL_MIN_BYTES", 0)  # every final Gram moves to a temporary file
        segmented = all_statistics(model, names, (feed for feed in batches), mask)  # a generator is fine too
        monkeypatch.setattr(statistics, "SEGMENT_BYTES", 1 << 30)
        assert_same_statistics(segmented, whole, exact=not optimize)
        spilled = [gram for gram, _, _ in segmented.values() if gram is not None]
        assert spilled and all(isinstance(gram, np.memmap) and not gram.flags.writeable for gram in spilled)


def test_statistics_in_segments_hold_one_segment_at_a_time(rng, monkeypatch):
    model = shared_input_model(rng)
    made = []
    original = statistics.segment_values

    def counting(model, feeds, wanted, max_bytes, options, providers):
        made.extend(statistics.plan_segments(model.graph, max_bytes, wanted))
        return original(model, feeds, wanted, max_bytes, options, providers)

    monkeypatch.setattr(statistics, "segment_values", counting)
    monkeypatch.setattr(statistics, "SEGMENT_BYTES", 64)
    collect_statistics(model, ["Q", "K", "O"], [{"X": rng.standard_normal((5, 8)).astype(np.float32)}])
    assert len(made) == 3  # one per weight-reading MatMul: each session holds one weight
