"""Calibration data: every source format, every validation error (one line naming the input), seeded sub-sampling and
batching of samples back into feeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader

from jlcm_onnx.analysis.calibration import DYNAMIC, FIXED, WHOLE, CalibrationData, load_calibration
from jlcm_onnx.errors import CalibrationError, ConfigError, JlcmError, ModelError

from conftest import FLOAT, INT64, make_model, matmul_model, run, tensor, value


@pytest.fixture()
def model() -> onnx.ModelProto:
    """``Y = X @ W``, X float32 [N, 4]."""
    return matmul_model(np.arange(12, dtype=np.float32).reshape(4, 3))


def text_model(batch: int | str = "batch") -> onnx.ModelProto:
    """Token embeddings masked by the attention mask: input_ids, attention_mask int64 [batch, seq]."""
    table = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["Y"]),
    ]
    return make_model(
        nodes,
        [value("input_ids", INT64, [batch, "seq"]), value("attention_mask", INT64, [batch, "seq"])],
        [value("Y", FLOAT, [batch, "seq", 8])],
        [tensor("E", table), tensor("axes", np.array([2], dtype=np.int64))],
    )


def rows(count: int, start: int = 0) -> np.ndarray:
    """[count, 4] float32 whose row i is filled with start + i, so a sample tells where it came from."""
    return np.repeat(np.arange(start, start + count, dtype=np.float32)[:, None], 4, axis=1)


def ids_of(data: CalibrationData) -> list[int]:
    return [int(sample["X"][0, 0]) for sample in data]


# ---------------------------------------------------------------------------------------------------------- formats


def test_npz_file_rows_become_samples(model: onnx.ModelProto, tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", X=rows(10))
    data = load_calibration(tmp_path / "calib.npz", model, samples=None)
    assert data.mode == DYNAMIC and len(data) == 10 and data.available == 10
    assert all(sample["X"].shape == (1, 4) for sample in data)
    assert ids_of(data) == list(range(10))
    assert np.allclose(run(model, data.samples[3])[0], rows(1, 3) @ np.arange(12, dtype=np.float32).reshape(4, 3))


def test_model_given_as_a_path(model: onnx.ModelProto, tmp_path: Path) -> None:
    onnx.save(model, tmp_path / "m.onnx")
    assert len(load_calibration({"X": rows(3)}, tmp_path / "m.onnx")) == 3
    with pytest.raises(ModelError, match="does not exist"):
        load_calibration({"X": rows(3)}, tmp_path / "missing.onnx")


def test_folder_of_npy_and_npz_files(tmp_path: Path) -> None:
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.save(tmp_path / "input_ids.npy", ids)
    np.save(tmp_path / "attention_mask.npy", np.ones((2, 3), np.int64))
    np.savez(tmp_path / "b.npz", input_ids=ids + 10, attention_mask=np.ones((2, 3), np.int64))
    np.savez(tmp_path / "a.npz", input_ids=ids + 20, attention_mask=np.ones((2, 3), np.int64))
    (tmp_path / "README.txt").write_text("ignored")
    data = load_calibration(tmp_path, text_model(), samples=None)
    # the .npy files form the first feed, then the .npz files in name order (a before b)
    assert [int(s["input_ids"][0, 0]) for s in data] == [0, 3, 20, 23, 10, 13]


def test_dict_iterable_and_generator(model: onnx.ModelProto) -> None:
    assert ids_of(load_calibration({"X": rows(2)}, model)) == [0, 1]
    assert ids_of(load_calibration([{"X": rows(2)}, {"X": rows(1, 5)}], model)) == [0, 1, 5]

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        for start in (7, 9):
            yield {"X": rows(2, start)}

    assert ids_of(load_calibration(feeds(), model)) == [7, 8, 9, 10]


class Reader(CalibrationDataReader):
    """An onnxruntime.quantization reader, as written for quantize_static."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


class DuckReader:
    """Only the protocol: get_next() returning a feed dict, then None."""

    def __init__(self, count: int) -> None:
        self.calls = 0
        self.count = count

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.calls += 1
        return {"X": rows(1, self.calls)} if self.calls <= self.count else None


def test_calibration_data_reader_protocol(model: onnx.ModelProto) -> None:
    assert ids_of(load_calibration(Reader([{"X": rows(2)}, {"X": rows(1, 4)}]), model)) == [0, 1, 4]
    duck = DuckReader(3)
    assert ids_of(load_calibration(duck, model)) == [1, 2, 3]
    assert duck.calls == 4  # stopped at the first None


def test_calibration_data_is_a_source_too(model: onnx.ModelProto) -> None:
    data = load_calibration({"X": rows(10)}, model, samples=None)
    again = load_calibration(data, model, samples=4, seed=3)
    assert len(again) == 4 and set(ids_of(again)) <= set(range(10))


def test_fixed_batch_dim_makes_slices_of_the_declared_batch() -> None:
    fixed = matmul_model(np.ones((4, 3), np.float32), batch=2)
    data = load_calibration({"X": rows(6)}, fixed, samples=None)
    assert data.mode == FIXED and len(data) == 3
    assert [s["X"].shape for s in data] == [(2, 4)] * 3
    assert [b["X"].shape for b in data.batches(16)] == [(2, 4)] * 3  # a fixed batch is never concatenated
    with pytest.raises(CalibrationError, match="input 'X' has 5 items along axis 0, not a multiple of the model's "
                                               "batch size 2"):
        load_calibration({"X": rows(5)}, fixed)


def test_scalar_input_keeps_feeds_whole() -> None:
    scaled = make_model([helper.make_node("Mul", ["X", "s"], ["Y"])],
                        [value("X", FLOAT, ["N", 2]), value("s", FLOAT, [])], [value("Y", FLOAT, ["N", 2])])
    feeds = [{"X": np.ones((3, 2), np.float32), "s": np.float32(k)} for k in range(2)]
    feeds = [{"X": f["X"], "s": np.asarray(f["s"])} for f in feeds]
    data = load_calibration(feeds, scaled)
    assert data.mode == WHOLE and len(data) == 2 and data.samples[0]["X"].shape == (3, 2)


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"X": rows(2), "Z": rows(2)}, "calibration feed 0: 'Z' is not an input of the model (inputs: X)"),
        ({}, "calibration feed 0: model input 'X' is missing (the feed has: nothing)"),
        ({"X": rows(2).astype(np.float64)}, "calibration feed 0: input 'X' has dtype float64, the model expects "
                                            "float32"),
        ({"X": rows(2).astype(np.float16)}, "input 'X' has dtype float16, the model expects float32"),
        ({"X": rows(2)[:, :3]}, "input 'X' has shape [2, 3], the model expects float32 [?, 4] (dim 1 is 3, "
                                "expected 4)"),
        ({"X": rows(2)[None]}, "input 'X' has shape [1, 2, 4] (rank 3), the model expects rank 2: float32 [?, 4]"),
        ({"X": np.where(rows(3) == 1, np.nan, rows(3))}, "input 'X' contains 4 NaN value(s)"),
        ({"X": np.where(rows(3) == 2, -np.inf, rows(3))}, "input 'X' contains 4 Inf value(s)"),
        ({"X": rows(0)}, "input 'X' has no items (axis 0 has length 0)"),
    ],
)
def test_bad_feed_is_one_line_naming_the_input(model: onnx.ModelProto, feed: dict, message: str) -> None:
    with pytest.raises(CalibrationError) as error:
        load_calibration(feed, model)
    assert message in str(error.value)
    assert len(str(error.value).splitlines()) == 1
    assert isinstance(error.value, JlcmError)


def test_errors_name_the_feed_that_is_wrong(model: onnx.ModelProto, tmp_path: Path) -> None:
    good, bad = {"X": rows(2)}, {"X": rows(2).astype(np.int64)}
    with pytest.raises(CalibrationError, match="^calibration feed 2: input 'X' has dtype int64"):
        load_calibration([good, good, bad], model)
    np.savez(tmp_path / "bad.npz", X=rows(2).astype(np.float64))
    with pytest.raises(CalibrationError, match=r"^calibration file .*bad\.npz: input 'X' has dtype float64"):
        load_calibration(tmp_path / "bad.npz", model)


def test_inputs_of_different_lengths() -> None:
    feed = {"input_ids": np.zeros((3, 4), np.int64), "attention_mask": np.ones((2, 4), np.int64)}
    with pytest.raises(CalibrationError, match=r"different lengths along the batch axis 0 \(input_ids: 3, "
                                               r"attention_mask: 2\)"):
        load_calibration(feed, text_model())


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ([], "the calibration data holds no samples"),
        (iter(()), "the calibration data holds no samples"),
        (DuckReader(0), "the calibration data holds no samples"),
        ([[1, 2]], "calibration feed 0 is a list, expected a dict of input name -> array"),
        (42, "calibration data of type int is not supported"),
    ],
)
def test_empty_or_unsupported_sources(model: onnx.ModelProto, source: object, message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        load_calibration(source, model)


def test_bad_paths(model: onnx.ModelProto, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "nothing.npz", model)
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(CalibrationError, match=r"data\.csv is not a \.npz file"):
        load_calibration(tmp_path / "data.csv", model)
    (tmp_path / "broken.npz").write_bytes(b"not a zip archive")
    with pytest.raises(CalibrationError, match=r"cannot read calibration file .*broken\.npz"):
        load_calibration(tmp_path / "broken.npz", model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="holds no .npy or .npz files"):
        load_calibration(empty, model)


@pytest.mark.parametrize(("field", "value"), [("samples", 0), ("samples", 2.5), ("seed", -1)])
def test_bad_settings_are_config_errors(model: onnx.ModelProto, field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        load_calibration({"X": rows(2)}, model, **{field: value})


# ------------------------------------------------------------------------------------------------------ sub-sampling


def test_subsampling_is_seeded_and_keeps_order(model: onnx.ModelProto) -> None:
    source = [{"X": rows(50, 100 * k)} for k in range(4)]  # 200 samples in 4 feeds
    first = ids_of(load_calibration(source, model, samples=20, seed=7))
    assert len(first) == 20 and first == sorted(first)
    assert first == ids_of(load_calibration(source, model, samples=20, seed=7))
    assert first != ids_of(load_calibration(source, model, samples=20, seed=8))
    data = load_calibration(source, model, samples=20, seed=7)
    assert (len(data), data.available) == (20, 200)
    assert ids_of(load_calibration(source, model, samples=None)) == [100 * k + i for k in range(4) for i in range(50)]
    assert len(load_calibration(source, model, samples=500)) == 200  # fewer than asked: all of them


# ---------------------------------------------------------------------------------------------------------- batches


def test_batches_concatenate_along_axis_0(model: onnx.ModelProto) -> None:
    data = load_calibration({"X": rows(7)}, model)
    batches = list(data.batches(3))
    assert [b["X"].shape[0] for b in batches] == [3, 3, 1]
    assert np.array_equal(np.concatenate([b["X"] for b in batches]), rows(7))
    assert len(list(data.batches(1))) == 7
    with pytest.raises(ConfigError, match="batch_size"):
        next(data.batches(0))


def test_batches_only_concatenate_equal_sequence_lengths() -> None:
    model = text_model()
    feeds = [
        {"input_ids": np.full((2, 5), 1, np.int64), "attention_mask": np.ones((2, 5), np.int64)},
        {"input_ids": np.full((3, 7), 2, np.int64), "attention_mask": np.ones((3, 7), np.int64)},
        {"input_ids": np.full((1, 5), 3, np.int64), "attention_mask": np.ones((1, 5), np.int64)},
    ]
    data = load_calibration(feeds, model)
    assert len(data) == 6
    shapes = [b["input_ids"].shape for b in data.batches(2)]
    assert shapes == [(2, 5), (1, 5), (2, 7), (1, 7)]
    assert [b["input_ids"].shape for b in data.batches(8)] == [(3, 5), (3, 7)]
    for batch in data.batches(8):  # every batch runs in onnxruntime
        assert run(model, batch)[0].shape == (*batch["input_ids"].shape, 8)
