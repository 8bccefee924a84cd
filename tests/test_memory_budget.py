"""Encoders work on a tensor a chunk of rows at a time: the output is byte-identical to the unchunked encoding, and the
peak memory grows with the chunk, not with the tensor."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from jlcm_onnx.encodings import codebook
from jlcm_onnx.encodings.affine_blocks import fit_affine_blocks
from jlcm_onnx.encodings.codebook import EncodedMatrix, encode_matrix, equal_group_sizes
from jlcm_onnx.encodings.multi_scaling import encode_scaled_matrix
from jlcm_onnx.encodings.outliers import select_outliers
from jlcm_onnx.ir.model_skeleton import skeleton
from jlcm_onnx.memory_budget import chunk_weights, estimated_peak, group_chunks, row_chunks

ROWS, COLS = 96, 80
WHOLE = 1 << 30


def weight(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((ROWS, COLS)) * rng.lognormal(0, 0.5, (ROWS, 1))
    matrix.reshape(-1)[rng.choice(matrix.size, 40, replace=False)] *= 12  # outliers
    return matrix.astype(np.float32)


def assert_identical(first: EncodedMatrix, second: EncodedMatrix) -> None:
    for name in ("codebooks", "codes", "outlier_index", "outlier_values", "scales", "shared_codebook", "block_scales",
                 "block_offsets"):
        a, b = getattr(first, name), getattr(second, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert first.group_sizes == second.group_sizes


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 4, "groups": None},
        {"bits": 3, "groups": 7},
        {"bits": 2, "groups": 5, "outlier_fraction": 0.01},
        {"bits": 3, "groups": 1, "block_size": 32},
        {"bits": 3, "groups": 6, "block_size": 16, "outlier_fraction": 0.005},
        {"bits": 4, "groups": None, "importance": True},
        {"bits": 3, "groups": 4, "importance": True, "outlier_fraction": 0.01, "block_size": 32},
    ],
    ids=str,
)
@pytest.mark.parametrize("chunk", [COLS, 3 * COLS + 7, 20 * COLS])
def test_chunked_multi_codebook_is_byte_identical(options: dict, chunk: int) -> None:
    options = dict(options)
    sizes = equal_group_sizes(ROWS, options.pop("groups"))
    importance = None
    if options.pop("importance", False):
        importance = np.broadcast_to(np.random.default_rng(1).uniform(0.1, 2.0, COLS), (ROWS, COLS))
    bits = options.pop("bits")
    whole = encode_matrix(weight(), bits, sizes, np.dtype(np.float16), importance=importance, chunk_weights=WHOLE,
                          **options)
    chunked = encode_matrix(weight(), bits, sizes, np.dtype(np.float16), importance=importance, chunk_weights=chunk,
                            **options)
    assert_identical(whole, chunked)


@pytest.mark.parametrize("chunk", [COLS, 5 * COLS])
def test_chunked_multi_scaling_is_byte_identical(chunk: int) -> None:
    sizes = equal_group_sizes(ROWS, 8)
    whole = encode_scaled_matrix(weight(), 3, sizes, np.dtype(np.float16), outlier_fraction=0.01, chunk_weights=WHOLE)
    chunked = encode_scaled_matrix(weight(), 3, sizes, np.dtype(np.float16), outlier_fraction=0.01,
                                   chunk_weights=chunk)
    assert_identical(whole, chunked)


def test_chunked_outliers_match_a_global_selection_with_ties_to_the_lower_index() -> None:
    matrix = weight()
    values = matrix.astype(np.float64)
    score = np.abs(values - values.mean(1, keepdims=True)) / values.std(1, keepdims=True)
    expected = np.sort(np.lexsort((np.arange(score.size), -score.reshape(-1)))[:77])
    for chunk in (COLS, 7 * COLS, WHOLE):
        assert np.array_equal(select_outliers(matrix, 77 / matrix.size, chunk), expected)
    tied = np.zeros((4, 8), np.float32)
    tied[:, 0] = 1.0  # every row has the same score pattern: four tied outliers, the lowest two indices win
    assert select_outliers(tied, 2 / tied.size, 8).tolist() == [0, 8]


def test_affine_blocks_fit_is_chunk_invariant() -> None:
    for float_offsets in (False, True):
        whole = fit_affine_blocks(weight(), 4, 16, np.dtype(np.float16), float_offsets=float_offsets,
                                  chunk_weights=WHOLE)
        chunked = fit_affine_blocks(weight(), 4, 16, np.dtype(np.float16), float_offsets=float_offsets,
                                    chunk_weights=3 * COLS)
        for name in ("codes", "scales", "zero_points", "offsets"):
            assert np.array_equal(getattr(whole, name), getattr(chunked, name)), name


@pytest.mark.parametrize("options", [{"groups": 7, "outlier_fraction": 0.01}, {"groups": 4, "block_size": 16}], ids=str)
def test_decoding_a_chunk_of_rows_at_a_time_is_exact(monkeypatch: pytest.MonkeyPatch, options: dict) -> None:
    block = {"block_size": options["block_size"]} if "block_size" in options else {}
    encoded = encode_matrix(weight(), 3, equal_group_sizes(ROWS, options["groups"]), np.dtype(np.float16),
                            outlier_fraction=options.get("outlier_fraction", 0.0), **block)
    whole = encoded.decode()
    monkeypatch.setattr(codebook, "MAX_CHUNK_WEIGHTS", 3 * COLS + 5)  # chunks of 3 rows, the last one shorter
    assert encoded.decode().tobytes() == whole.tobytes()
    assert encoded.decode(slice(10, 50)).tobytes() == whole[10:50].tobytes()
    expected = encoded.codebooks.astype(np.float32)[np.repeat(np.arange(len(encoded.group_sizes)),
                                                              encoded.group_sizes)[:, None], encoded.codes]
    if not block:  # the codebook entries the codes name, with the outliers in their places
        expected.reshape(-1)[encoded.outlier_index] = encoded.outlier_values
        assert np.array_equal(whole, expected)


def test_group_chunks_cover_every_group_once_and_respect_the_size() -> None:
    sizes = (3, 1, 4, 1, 5, 9, 2, 6)
    chunks = list(group_chunks(sizes, 10, 60))
    assert [c.group_start for c in chunks] == [0, *[c.group_stop for c in chunks[:-1]]]
    assert chunks[-1].group_stop == len(sizes) and chunks[-1].row_stop == sum(sizes)
    for chunk in chunks:
        assert chunk.row_stop - chunk.row_start == sum(sizes[chunk.groups])
        assert (chunk.row_stop - chunk.row_start) * 10 <= 60 or chunk.group_stop - chunk.group_start == 1
    assert [(s.start, s.stop) for s in row_chunks(10, 4, 12)] == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_the_chunk_shrinks_with_the_budget_and_the_workers() -> None:
    assert chunk_weights(16 << 30, 2) > chunk_weights(1 << 30, 2) >= chunk_weights(1 << 30, 8)
    assert chunk_weights(1, 1) > 0


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from jlcm_onnx.encodings.codebook import encode_matrix, equal_group_sizes

    rows, cols, chunk, blocks = (int(a) for a in sys.argv[1:5])
    matrix = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    before = status("VmRSS:")
    encode_matrix(matrix, 4, equal_group_sizes(rows, None), np.dtype(np.float16), max_iterations=3,
                  block_size=blocks or None, chunk_weights=chunk)
    print(json.dumps({"peak": status("VmHWM:") - before}))
""")


def encoding_peak(rows: int, cols: int, chunk: int, block_size: int = 0) -> int:
    """Peak RSS above the baseline of encoding a [rows, cols] matrix in a fresh process."""
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(rows), str(cols), str(chunk), str(block_size)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["peak"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("block_size", [0, 32], ids=["per-row", "input blocks"])
def test_encoding_peak_grows_with_the_chunk_not_with_the_tensor(block_size: int) -> None:
    cols, chunk = 256, 1 << 15
    small, large = encoding_peak(512, cols, chunk, block_size), encoding_peak(4096, cols, chunk, block_size)
    grown = (large - small) / ((4096 - 512) * cols)
    # The larger tensor adds its codes (1 byte per weight) and allocator slack; unchunked it adds ~100+ bytes/weight.
    assert grown < 12, f"peak grew by {grown:.1f} bytes per extra weight"
    unchunked = encoding_peak(4096, cols, 1 << 30, block_size)
    assert unchunked > 4 * large, (unchunked, large)


def big_weight_model(inner: int = 256) -> onnx.ModelProto:
    """Y = Reshape(X @ W, shape): a 256 KB weight and a small shape constant that shape inference reads."""
    weight = np.random.default_rng(0).standard_normal((inner, 256)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Reshape", ["H", "shape"], ["Y"])],
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None, None])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array([-1, 16, 16], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_skeleton_keeps_structure_and_small_constants_but_no_large_weight() -> None:
    model = big_weight_model()
    light = skeleton(model)
    assert light.ByteSize() < 2048 < model.ByteSize()
    assert [t.name for t in light.graph.initializer] == ["shape"] and "W" in [i.name for i in light.graph.input]
    onnx.checker.check_model(light, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=True)
    assert inferred.graph.output[0].type == onnx.shape_inference.infer_shapes(model).graph.output[0].type


def test_the_skeleton_fails_the_full_check_where_the_model_does() -> None:
    broken = big_weight_model(inner=128)  # X [N, 256] @ W [128, 256]: the inner dimensions differ
    for model in (broken, skeleton(broken)):
        with pytest.raises(onnx.shape_inference.InferenceError):
            onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("encode", [encode_matrix, encode_scaled_matrix], ids=["multi-codebook", "multi-scaling"])
def test_importances_as_a_broadcast_view_encode_like_a_full_array(encode) -> None:  # noqa: ANN001
    """Calibration hands the encoders one row of importances broadcast over the rows (no copy); outliers must still
    get zero weight in it."""
    row = np.random.default_rng(2).uniform(0.1, 2.0, COLS)
    sizes = equal_group_sizes(ROWS, 8)
    view = encode(weight(), 3, sizes, np.dtype(np.float16), importance=np.broadcast_to(row, (ROWS, COLS)),
                  outlier_fraction=0.01)
    full = encode(weight(), 3, sizes, np.dtype(np.float16), importance=np.tile(row, (ROWS, 1)), outlier_fraction=0.01)
    assert_identical(view, full)


def test_row_descriptors_and_clusters_do_not_depend_on_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from jlcm_onnx.analysis import grouping

    matrix = np.repeat(weight(), 4, axis=0)
    whole = grouping.row_descriptors(matrix)
    groups = grouping.cluster_descriptors(whole, 12)
    monkeypatch.setattr(grouping, "MAX_CHUNK_WEIGHTS", 3 * COLS + 1)
    assert np.array_equal(grouping.row_descriptors(matrix), whole)
    chunked = grouping.cluster_descriptors(whole, 12)
    assert np.array_equal(chunked.permutation, groups.permutation) and chunked.sizes == groups.sizes


def test_the_estimate_counts_the_chunks_the_learning_and_the_grams() -> None:
    base = estimated_peak(1 << 30, 1 << 20, 2)
    assert estimated_peak(1 << 30, 1 << 20, 4) > base
    assert estimated_peak(1 << 30, 1 << 20, 2, learned_weights=10**6) - base == 125 * 10**6
    assert estimated_peak(1 << 30, 1 << 20, 2, gram_bytes=5) - base == 5


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sub_byte_packing_in_runs_is_byte_identical(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from jlcm_onnx.encodings import affine_decoder

    codes = np.random.default_rng(bits).integers(0, 1 << bits, 1001)
    whole = affine_decoder.pack_sub_byte(codes, bits)
    monkeypatch.setattr(affine_decoder, "PACK_CHUNK_BYTES", 3)
    assert affine_decoder.pack_sub_byte(codes, bits) == whole


RETENTION_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from jlcm_onnx.memory_budget import release_freed_memory

    def rss():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    big = np.ones(24 << 20, np.uint8)
    del big  # a freed 24 MB mapping raises glibc's dynamic threshold (up to 32 MB) to 24 MB
    kept, pins = [], []
    for _ in range(40):  # 6 MB arrays from the heap, each followed by one that stays, so the heap cannot shrink
        kept.append(np.ones(6 << 20, np.uint8))
        pins.append(np.ones(1 << 20, np.uint8))  # too large for the holes the imports left
    before = rss()
    del kept
    if sys.argv[1] == "release":
        release_freed_memory()
    print(before - rss())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_inside_the_heap_goes_back_to_the_system() -> None:
    """glibc keeps freed arrays of a few MB in its heap once its mmap threshold has risen; ``release_freed_memory``
    (called after each encoded tensor) hands them back."""
    released = {mode: int(subprocess.run([sys.executable, "-c", RETENTION_SCRIPT, mode], capture_output=True,
                                         text=True, check=True).stdout)
                for mode in ("release", "keep")}
    assert released["release"] > 200 << 20  # of 240 MB
    assert released["keep"] < 100 << 20
