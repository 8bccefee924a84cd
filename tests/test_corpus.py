"""A deterministic sample of the corpus run (``bench/corpus.py``): ONNX node-test models, compressed with
``min_elements=1`` and run against the original in onnxruntime on their bundled inputs; none may fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import script

ROOT = Path(__file__).resolve().parents[1]
corpus = script("bench/corpus.py")

#: Node tests whose frozen variant has weights to compress (MatMul/Gemm B, Conv/ConvTranspose W, Gather data).
WEIGHT_TESTS = ("test_conv", "test_gemm", "test_matmul", "test_gather_", "test_causal_conv")
SAMPLE = 15


@pytest.fixture(scope="module")
def results() -> list:
    folder = corpus.corpus_folder()
    names = corpus.case_names(folder)
    chosen = corpus.sample(names, SAMPLE) + corpus.sample([n for n in names if n.startswith(WEIGHT_TESTS)], SAMPLE)
    return [result for name in sorted(set(chosen)) for result in corpus.run_case(folder / name)]


def test_sample_has_no_failure(results):
    failed = [f"{r.name}: {r.reason}" for r in results if r.status == corpus.FAILED]
    assert failed == []
    assert {r.status for r in results} <= {corpus.COMPRESSED, corpus.UNCHANGED, corpus.REFUSED, corpus.SKIPPED}


def test_sample_compresses_and_checks_exactly(results):
    compressed = [r for r in results if r.status == corpus.COMPRESSED]
    assert len(compressed) >= 10
    assert all(r.max_relative_error <= r.tolerance + 1e-3 for r in compressed)
    assert sum(r.exact_checked for r in compressed) >= 5


def test_every_result_has_a_reason(results):
    assert all(r.reason for r in results if r.status in (corpus.UNCHANGED, corpus.REFUSED, corpus.SKIPPED))


def test_frozen_variant_moves_weight_inputs_into_initializers():
    import numpy as np
    from onnx import helper

    from conftest import FLOAT, make_model, value

    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [value("X", FLOAT, [2, 3]),
                       value("W", FLOAT, [3, 4])], [value("Y", FLOAT, [2, 4])])
    feed = {"X": np.ones((2, 3), np.float32), "W": np.ones((3, 4), np.float32)}
    frozen, rest = corpus.freeze_weights(model, feed)
    assert [i.name for i in frozen.graph.input] == ["X"] and [t.name for t in frozen.graph.initializer] == ["W"]
    assert list(rest) == ["X"]
    assert corpus.freeze_weights(model, {"X": feed["X"]}) == (None, {"X": feed["X"]})


def test_readme_tally_is_generated_with_zero_failed():
    readme = (ROOT / "README.md").read_text()
    block = readme.split(corpus.START, 1)[1].split(corpus.END, 1)[0]
    assert "`python bench/corpus.py`" in block
    assert block.strip().splitlines()[4].endswith("| **0** |")
