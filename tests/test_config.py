"""CompressionConfig validation: every bad value raises ConfigError naming the field and the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import jlcm_onnx
from jlcm_onnx import CompressionConfig, ConfigError, JlcmError


def test_defaults() -> None:
    config = CompressionConfig()
    assert config.bits == 4
    assert config.groups is None
    assert config.min_elements == 1024
    assert config.op_types == ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "LSTM", "GRU", "RNN",
                                "Add", "Sub", "Mul", "Div", "Where", "Concat", "Slice")
    assert config.codebook_dtype == "float16"
    assert config.include == () and config.exclude == ()


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("bits", 0),
        ("bits", 9),
        ("bits", -1),
        ("bits", "4"),
        ("bits", True),
        ("bits", 4.0),
        ("bits", None),
        ("groups", 0),
        ("groups", -2),
        ("groups", True),
        ("groups", 2.5),
        ("min_elements", 0),
        ("kmeans_iterations", 0),
        ("seed", -1),
        ("codebook_dtype", "int8"),
        ("codebook_dtype", "bfloat16"),
        ("op_types", ["Foo"]),
        ("op_types", ["MatMul", "Foo"]),
        ("op_types", []),
        ("op_types", "MatMul"),
        ("include", "*.weight"),
        ("exclude", [1]),
    ],
)
def test_bad_value_raises(field: str, bad: object) -> None:
    with pytest.raises(ConfigError) as caught:
        CompressionConfig(**{field: bad})
    error = caught.value
    assert error.field == field
    message = str(error)
    assert f"'{field}'" in message
    shown = repr(list(bad)) if isinstance(bad, (list, tuple)) else repr(bad)
    assert shown in message, message
    assert isinstance(error, JlcmError) and isinstance(error, ValueError)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_valid_bit_width(bits: int) -> None:
    assert CompressionConfig(bits=bits).bits == bits


def test_valid_values() -> None:
    config = CompressionConfig(bits=1, groups=1, min_elements=1, op_types=["Gather"], include=["a*"],
                               exclude=["b*"], codebook_dtype="float32", kmeans_iterations=1, seed=7)
    assert config.op_types == ("Gather",) and config.include == ("a*",) and config.exclude == ("b*",)
    assert isinstance(config.op_types, tuple)
    hash(config)  # frozen and hashable once lists became tuples


def test_frozen() -> None:
    config = CompressionConfig()
    with pytest.raises(AttributeError):
        config.bits = 3  # type: ignore[misc]


def test_from_dict_unknown_key() -> None:
    with pytest.raises(ConfigError) as caught:
        CompressionConfig.from_dict({"bits": 3, "bitz": 5})
    assert caught.value.field == "bitz"
    assert "'bitz'" in str(caught.value) and "5" in str(caught.value)


def test_from_dict_bad_value() -> None:
    with pytest.raises(ConfigError, match="'groups' = 0"):
        CompressionConfig.from_dict({"groups": 0})


def test_dict_round_trip() -> None:
    config = CompressionConfig(bits=3, groups=8, op_types=["MatMul", "Gemm"], exclude=["*bias*"])
    values = config.to_dict()
    assert values["op_types"] == ["MatMul", "Gemm"]
    json.dumps(values)  # plain JSON types only
    assert CompressionConfig.from_dict(values) == config


def test_replace_validates() -> None:
    config = CompressionConfig(bits=3)
    assert config.replace(groups=2) == CompressionConfig(bits=3, groups=2)
    with pytest.raises(ConfigError, match="'bits'"):
        config.replace(bits=12)
    assert config.bits == 3


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"bits": 2, "groups": 4, "min_elements": 16, "exclude": ["head.*"],
                                "codebook_dtype": "float32"}))
    config = CompressionConfig.from_file(path)
    assert config == CompressionConfig(bits=2, groups=4, min_elements=16, exclude=("head.*",), codebook_dtype="float32")
    assert CompressionConfig.from_file(str(path)) == config


def test_from_file_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"bits": 9}))
    with pytest.raises(ConfigError, match="'bits' = 9"):
        CompressionConfig.from_file(path)
    path.write_text(json.dumps({"bits": 3, "colour": "red"}))
    with pytest.raises(ConfigError, match="'colour'"):
        CompressionConfig.from_file(path)


@pytest.mark.parametrize("content", ["not json {", "[1, 2]", "3"])
def test_from_file_not_a_config(tmp_path: Path, content: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(JlcmError, match="config"):
        CompressionConfig.from_file(path)


def test_from_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JlcmError):
        CompressionConfig.from_file(tmp_path / "missing.json")


def test_compress_rejects_non_config() -> None:
    with pytest.raises(JlcmError):
        jlcm_onnx.compress("unused.onnx", {"bits": 4})  # type: ignore[arg-type]
