"""Speed 'balanced' and per-weight speeds: which weights get fused affine blocks and which codebooks, under a latency
budget from the package's cost model; the estimate in the report; config and CLI errors."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig, ConfigError
from jlcm_onnx.cli import main
from jlcm_onnx.encodings.affine_format import FUSED
from jlcm_onnx.pipeline.balanced_speed import WeightFormats, in_codebooks_within, plan_speeds
from jlcm_onnx.pipeline.run_costs import RunCosts

from conftest import FLOAT, INT64, check_full, make_model, run, tensor, value

#: Run times per weight chosen for the tests: codebooks 10x the dense product, fused blocks half of it.
COSTS = RunCosts(dense=1.0, codebook={2: 10.0, 4: 10.0}, fused={2: {32: 0.5}, 4: {32: 0.5}}, machine="a test")


def two_layer_model(rng: np.random.Generator) -> tuple:
    """X -> MatMul(levels) -> MatMul(gaussian), and an embedding table: 'levels' holds 16 uneven values per row,
    which per-row codebooks store exactly and uniform blocks cannot; 'gaussian' is plain noise."""
    grid = np.sort(rng.standard_normal((64, 16)) ** 3, axis=1)
    levels = np.take_along_axis(grid, rng.integers(0, 16, (64, 64)), axis=1).T.astype(np.float32)
    gaussian = rng.standard_normal((64, 64)).astype(np.float32)
    table = rng.standard_normal((40, 64)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["E"]), helper.make_node("MatMul", ["E", "levels"], ["H"]),
         helper.make_node("MatMul", ["H", "gaussian"], ["Y"])],
        [value("ids", INT64, ["N"])], [value("Y", FLOAT, ["N", 64])],
        [tensor("table", table), tensor("levels", levels), tensor("gaussian", gaussian)])
    return model, {"ids": np.arange(8, dtype=np.int64)}


def test_codebooks_go_where_they_save_most_within_the_budget(rng: np.random.Generator) -> None:
    model, _ = two_layer_model(rng)
    config = CompressionConfig(bits=4, speed="balanced", min_elements=64, max_latency_ratio=1.1)
    assert plan_speeds(model, config, costs=COSTS).fast == ("levels", "gaussian")  # no room: both fused
    roomy = plan_speeds(model, config.replace(max_latency_ratio=6.0), costs=COSTS)
    assert roomy.fast == ("gaussian",)  # room for one weight in codebooks: the one they store exactly
    assert roomy.estimated_ratio == pytest.approx((10.0 + 0.5) / 2) and "1 in codebooks" in roomy.note
    assert "at most 6x" in roomy.note and "a test" in roomy.note


def test_weights_move_to_codebooks_by_error_saved_per_nanosecond() -> None:
    weights = [WeightFormats("small gain", 100, 0.09, 0.10, 10.0, 0.5),  # saves 0.01 for 950 ns
               WeightFormats("large gain", 100, 0.00, 0.05, 10.0, 0.5),  # saves 0.05 for 950 ns
               WeightFormats("no gain", 100, 0.10, 0.05, 10.0, 0.5)]
    assert in_codebooks_within(weights, 150.0, 1100.0) == ({"large gain"}, 1100.0)
    assert in_codebooks_within(weights, 150.0, 2100.0) == ({"large gain", "small gain"}, 2050.0)
    assert in_codebooks_within(weights, 150.0, 1000.0) == (set(), 150.0)


def test_a_balanced_file_fuses_what_the_plan_says_and_runs(rng: np.random.Generator) -> None:
    model, feeds = two_layer_model(rng)
    result = jlcm_onnx.compress(model, CompressionConfig(bits=4, speed="balanced", min_elements=64))
    check_full(result.model)
    records = {r.name: r for r in result.report.compressed}
    speeds = plan_speeds(model, CompressionConfig(bits=4, speed="balanced", min_elements=64))
    for name in ("levels", "gaussian"):
        fused = records[name].decode_gate == FUSED
        assert fused == (name in speeds.fast)
    assert records["table"].encoding.startswith("multi-codebook") and records["table"].estimated_ns is None
    assert any(note.startswith("speed balanced:") for note in result.report.notes)
    (output,) = run(result.model, feeds)
    (reference,) = run(model, feeds)
    assert np.abs(output - reference).max() < 0.2 * np.abs(reference).max()


def test_the_report_estimates_each_product_from_the_cost_model(rng: np.random.Generator) -> None:
    model, _ = two_layer_model(rng)
    costs = RunCosts.packaged()
    config = CompressionConfig(bits=4, min_elements=64, overrides=[{"name": "gaussian", "speed": "fast"}])
    records = {r.name: r for r in jlcm_onnx.compress(model, config).report.compressed}
    assert records["gaussian"].decode_gate == FUSED  # a weight's own speed
    assert records["gaussian"].estimated_ns == pytest.approx(64 * 64 * costs.fused_ns(4, 32), abs=0.1)
    assert records["levels"].estimated_ns == pytest.approx(64 * 64 * costs.codebook_ns(4), abs=0.1)
    table = jlcm_onnx.compress(model, config).report.format_table()
    assert "est. us" in table.splitlines()[0] and f"{records['levels'].estimated_ns / 1e3:.1f}" in table


def test_balanced_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="max_latency_ratio"):
        CompressionConfig(speed="balanced", max_latency_ratio=1.0)
    with pytest.raises(ConfigError, match="vector_dim"):
        CompressionConfig(bits=3, speed="balanced", vector_dim=2)
    with pytest.raises(ConfigError, match="target_ratio"):
        CompressionConfig(speed="balanced", target_ratio=6)
    with pytest.raises(ConfigError, match="block_size"):
        CompressionConfig(speed="balanced", block_size=24)
    with pytest.raises(ConfigError, match="a speed of 'small' or 'fast'"):
        CompressionConfig(overrides=[{"name": "w", "speed": "balanced"}])
    with pytest.raises(ConfigError, match="2, 4 or 8"):
        CompressionConfig(bits=3, overrides=[{"name": "w", "speed": "fast"}])
    assert CompressionConfig(bits=3, speed="balanced").codebook_block_size is None  # 3 bits: codebooks everywhere


def test_the_cli_takes_balanced_and_refuses_a_bad_ratio(tmp_path, rng: np.random.Generator) -> None:
    model, _ = two_layer_model(rng)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    runner = CliRunner()
    done = runner.invoke(main, ["compress", str(path), "-o", str(tmp_path / "b.onnx"), "--speed", "balanced",
                                "--max-latency-ratio", "3", "--min-elements", "64", "--quiet"])
    assert done.exit_code == 0, done.output
    refused = runner.invoke(main, ["compress", str(path), "-o", str(tmp_path / "c.onnx"), "--speed", "balanced",
                                   "--max-latency-ratio", "0.5", "--quiet"])
    assert refused.exit_code == 2 and "max_latency_ratio" in refused.output
    assert not (tmp_path / "c.onnx").exists()
