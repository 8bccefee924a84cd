"""The order the encoder takes tensors in with calibration statistics (passes/encode_weights.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from jlcm_onnx.passes import encode_weights
from jlcm_onnx.passes.encode_weights import _encoding_order


def tensors(sizes: list[int]) -> list[tuple[SimpleNamespace, int]]:
    return [(SimpleNamespace(name=f"w{index}", num_elements=size), 0) for index, size in enumerate(sizes)]


def plan_with_grams(grams: dict[str, np.ndarray | None]) -> SimpleNamespace:
    return SimpleNamespace(statistics={name: SimpleNamespace(gram=gram) for name, gram in grams.items()})


def test_largest_starts_first_when_all_statistics_fit_beside_it():
    todo = tensors([30, 10, 500, 20])
    plan = plan_with_grams({f"w{i}": np.zeros((4, 4)) for i in range(4)})
    assert _encoding_order(todo, plan) == [2, 1, 3, 0]


def test_largest_waits_until_the_statistics_held_after_it_fit_the_cap(monkeypatch):
    monkeypatch.setattr(encode_weights, "OVERLAP_STATISTICS_BYTES", 3 * 800)  # three 10 x 10 float64 Grams
    shared = np.zeros((10, 10))
    grams = {"w0": np.zeros((10, 10)), "w1": np.zeros((10, 10)), "w2": shared, "w3": shared, "w4": np.zeros((10, 10)),
             "w5": None, "w6": np.zeros((10, 10))}
    todo = tensors([1, 2, 3, 4, 5, 6, 7, 1000])
    order = _encoding_order(todo, plan_with_grams(grams))
    # after the largest: w2 and w3 (one shared Gram), w4, w5 (none) and w6 hold three Grams; w1's would be a fourth
    assert order == [0, 1, 7, 2, 3, 4, 5, 6]


def test_no_tensors():
    assert _encoding_order([], plan_with_grams({})) == []
