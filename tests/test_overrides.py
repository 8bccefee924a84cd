"""Per-tensor overrides (config ``overrides``, CLI ``--override``): global settings, then op-type overrides, then
name overrides, each in list order."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig, ConfigError
from jlcm_onnx.cli import main, parse_override

from conftest import FLOAT, INT64, make_model, run, tensor, value


def model_with_table(rng: np.random.Generator) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(W1) -> Relu -> MatMul(W2)."""
    weights = {"table": (512, 64), "W1": (64, 256), "W2": (256, 64)}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [value("ids", INT64, ["N"])], [value("y", FLOAT, ["N", 64])],
                      [tensor(name, rng.standard_normal(shape).astype(np.float32)) for name, shape in weights.items()],
                      opset=21)


def test_op_type_then_name_overrides_in_list_order() -> None:
    config = CompressionConfig(overrides=[{"name": "W*", "bits": 2}, {"op_type": "MatMul", "bits": 6, "groups": 4},
                                          {"name": "W2", "bits": 3}])
    assert config.override_settings("W1", {"MatMul"}) == {"bits": 2, "groups": 4}
    assert config.override_settings("W2", {"MatMul"}) == {"bits": 3, "groups": 4}
    assert config.override_settings("table", {"Gather"}) == {}
    assert config.override_settings("table", {"Gather", "MatMul"}) == {"bits": 6, "groups": 4}


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"op_type": "MatMul", "bits": 3}, "a list of objects"),
    ([{"bits": 3}], "one of ['op_type', 'name']"),
    ([{"op_type": "MatMul", "name": "W", "bits": 3}], "one of ['op_type', 'name']"),
    ([{"op_type": "MatMul"}], "settings among"),
    ([{"op_type": "MatMul", "speed": "balanced"}], "a speed of 'small' or 'fast'"),
    ([{"op_type": "MatMul", "seed": 3}], "settings among"),
    ([{"op_type": "Softmax", "bits": 3}], "an op_type among"),
    ([{"name": 7, "bits": 3}], "a name glob given as a string"),
    ([{"name": "W1", "bits": 9}], "valid settings (an integer in 1..8)"),
    ([{"name": "W1", "outlier_fraction": 0.5}], "valid settings (a number in [0, 0.1])"),
])
def test_a_bad_override_is_a_config_error_naming_it(overrides: object, expected: str) -> None:
    with pytest.raises(ConfigError, match="config field 'overrides'") as raised:
        CompressionConfig(overrides=overrides)
    assert expected in str(raised.value)


def test_overrides_follow_the_speed_and_refuse_a_size_target() -> None:
    with pytest.raises(ConfigError, match="2, 4 or 8 with speed 'fast'"):
        CompressionConfig(speed="fast", overrides=[{"op_type": "MatMul", "bits": 3}])
    with pytest.raises(ConfigError, match="unset with a size target"):
        CompressionConfig(target_ratio=6.0, overrides=[{"op_type": "MatMul", "bits": 3}])


def test_overrides_round_trip_through_a_config_file_and_are_recorded_only_when_given(tmp_path) -> None:
    config = CompressionConfig(overrides=[{"op_type": "Gather", "bits": 8}])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert CompressionConfig.from_file(path) == config
    assert config.encoding_settings()["overrides"] == [{"op_type": "Gather", "bits": 8}]
    assert "overrides" not in CompressionConfig().encoding_settings()


def test_each_weight_gets_its_override(rng: np.random.Generator) -> None:
    model = model_with_table(rng)
    config = CompressionConfig(bits=4, min_elements=16, overrides=[
        {"op_type": "Gather", "bits": 8}, {"op_type": "MatMul", "bits": 3}, {"name": "W2", "bits": 2, "groups": 1}])
    result = jlcm_onnx.compress(model, config)
    records = {record.name: record for record in result.report.tensors}
    assert (records["table"].bits, records["W1"].bits, records["W2"].bits) == (8, 3, 2)
    assert records["W2"].groups == 1 and records["W1"].groups == 256
    stored = {t["name"]: t["bits"] for t in jlcm_onnx.read_metadata(result.model)["tensors"]}
    assert stored == {"table": 8, "W1": 3, "W2": 2}
    ids = {"ids": np.array([1, 2, 511])}
    assert run(result.model, ids)[0].shape == (3, 64)


def test_overrides_choose_bits_in_the_fast_format(rng: np.random.Generator) -> None:
    config = CompressionConfig(bits=4, speed="fast", min_elements=16, overrides=[{"name": "W2", "bits": 8}])
    records = {r.name: r for r in jlcm_onnx.compress(model_with_table(rng), config).report.tensors}
    assert records["W2"].bits == 8 and records["W1"].bits == 4
    assert records["W2"].encoding.startswith("affine blocks")


def test_the_cli_takes_overrides(tmp_path, rng: np.random.Generator) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(model_with_table(rng), str(path))
    runner = CliRunner()
    result = runner.invoke(main, ["compress", str(path), "-o", str(tmp_path / "o.onnx"), "--min-elements", "16",
                                  "--override", "op_type=Gather,bits=8", "--override", "name=W2,groups=none,bits=5",
                                  "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    bits = {t["name"]: (t["bits"], t["groups"]) for t in json.loads(result.stdout)["tensors"]}
    assert bits["table"][0] == 8 and bits["W2"] == (5, 64) and bits["W1"][0] == 4
    bad = runner.invoke(main, ["compress", str(path), "-o", str(tmp_path / "p.onnx"), "--override", "bits=3"])
    assert bad.exit_code == 2 and "config field 'overrides'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.onnx").exists()


def test_parse_override_reads_numbers_none_and_text() -> None:
    assert parse_override("name=*attn*, bits=6, groups=none, outlier_fraction=0.01") == {
        "name": "*attn*", "bits": 6, "groups": None, "outlier_fraction": 0.01}
    with pytest.raises(ConfigError, match="SELECTOR,SETTING=VALUE"):
        parse_override("bits")


def test_a_2_bit_override_raises_the_opset_2_bit_codes_need(rng: np.random.Generator) -> None:
    """The opset follows every bit width in use: 2-bit codes (UINT2) need opset 25, which 4 bits alone do not."""
    config = CompressionConfig(bits=4, speed="fast", min_elements=16, overrides=[{"name": "W2", "bits": 2}])
    result = jlcm_onnx.compress(model_with_table(rng), config)
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 25
    assert {r.name: r.bits for r in result.report.tensors}["W2"] == 2
    assert run(result.model, {"ids": np.array([0, 511])})[0].shape == (2, 64)
