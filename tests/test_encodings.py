"""Weight formats as strategy objects (jlcm_onnx.encodings.base, .registry): which format a weight gets, and a new
format added as one class and one registration, with no change anywhere else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig
from jlcm_onnx.config import MAX_BITS
from jlcm_onnx.encodings.affine_blocks import fit_affine_blocks
from jlcm_onnx.encodings.affine_format import AffineBlocksFormat
from jlcm_onnx.encodings.base import (
    DecoderContext,
    EncodeRequest,
    Encoding,
    SiteEncoding,
    WeightShape,
    WrittenDecoder,
)
from jlcm_onnx.encodings.codebook_decoder import DecodeGraph
from jlcm_onnx.encodings.codebook_formats import InputBlocks, MultiCodebook, MultiScaling
from jlcm_onnx.encodings.registry import encoding_for, register, registered, unregister
from jlcm_onnx.ir.weight_sites import WeightSite, compressible_row_axis, find_weight_sites

from conftest import FLOAT, INT64, make_model, run, tensor, value


def mlp_with_table(rng: np.random.Generator) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(W1) -> Relu -> MatMul(W2)."""
    weights = {"table": rng.standard_normal((512, 64)), "W1": rng.standard_normal((64, 256)),
               "W2": rng.standard_normal((256, 64))}
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [value("ids", INT64, ["N"])], [value("y", FLOAT, ["N", 64])],
                      [tensor(name, array.astype(np.float32)) for name, array in weights.items()], opset=21)


def sites(model: onnx.ModelProto, config: CompressionConfig) -> dict[str, tuple[WeightSite, int]]:
    found = {}
    for site in find_weight_sites(model):
        row_axis, _ = compressible_row_axis(site, config)
        if row_axis is not None:
            found[site.name] = (site, row_axis)
    return found


@pytest.mark.parametrize(("settings", "matmul", "table"), [
    ({"bits": 4}, MultiCodebook, MultiCodebook),
    ({"bits": 4, "block_size": 32}, InputBlocks, InputBlocks),
    ({"bits": 4, "encoding": "multi-scaling"}, MultiScaling, MultiScaling),
    ({"bits": 4, "speed": "fast"}, AffineBlocksFormat, MultiCodebook),
    ({"bits": 4, "speed": "fast", "affine_offsets": "float"}, AffineBlocksFormat, AffineBlocksFormat),
])
def test_the_registry_gives_each_weight_its_format(rng: np.random.Generator, settings: dict, matmul: type,
                                                   table: type) -> None:
    config = CompressionConfig(min_elements=16, **settings)
    found = sites(mlp_with_table(rng), config)
    assert type(encoding_for(*found["W1"], config)) is matmul
    assert type(encoding_for(*found["table"], config)) is table


@dataclass(frozen=True)
class HalfWeight:
    """The toy format's encoded value: the weight in float16."""

    values: np.ndarray

    def decode(self, rows: slice = slice(None)) -> np.ndarray:
        return self.values[rows].astype(np.float32)


class Float16Copy(Encoding):
    """A format written for this test only: the named weights stored in float16 and cast back by one node."""

    groups_rows = False

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def selects(self, site: WeightSite, row_axis: int, config: CompressionConfig) -> bool:
        return site.name in self.names

    def encode(self, matrix: np.ndarray, request: EncodeRequest, config: CompressionConfig) -> HalfWeight:
        return HalfWeight(matrix.astype(np.float16))

    def learn(self, matrix: np.ndarray, encoded: HalfWeight, gram: np.ndarray, config: CompressionConfig,
              device: str) -> tuple[HalfWeight, float]:
        return encoded, 0.0

    def stand_in(self, rows: int, cols: int, request: EncodeRequest, site: WeightSite, row_axis: int,
                 config: CompressionConfig) -> HalfWeight:
        return HalfWeight(np.zeros((rows, cols), np.float16))

    def stored_bytes(self, shape: WeightShape, bits: int, groups: int, outlier_fraction: float,
                     config: CompressionConfig) -> int:
        return 2 * shape.size

    def squared_errors(self, sample: np.ndarray, bit_widths: list[int], sizes: tuple[int, ...], dtype: np.dtype,
                       config: CompressionConfig, iterations: int) -> dict[int, float]:
        error = float(np.sum((sample.astype(np.float16).astype(np.float64) - sample) ** 2))
        return dict.fromkeys(bit_widths, error)

    def write(self, site: WeightSite, row_axis: int, encoding: SiteEncoding, context: DecoderContext) -> WrittenDecoder:
        stored = context.names.fresh(f"{site.name}.half")
        weight = np.moveaxis(encoding.encoded.values.reshape(site.shape[row_axis], -1), 0, row_axis)
        initializer = numpy_helper.from_array(np.ascontiguousarray(weight.reshape(site.shape)), stored)
        cast = helper.make_node("Cast", [stored], [site.name], to=site.tensor.data_type, name=stored + "/cast")
        return WrittenDecoder(DecodeGraph([cast], [initializer]), None, False, None,
                              dict(bits=16, encoding="float16 copy", outliers=0, decode_gate="none"))


@pytest.fixture
def float16_w2() -> Any:
    encoding = register(Float16Copy({"W2"}), first=True)
    yield encoding
    unregister(encoding)


def test_a_new_format_is_one_class_and_one_registration(rng: np.random.Generator, float16_w2: Encoding) -> None:
    model = mlp_with_table(rng)
    config = CompressionConfig(bits=4, min_elements=16)
    result = jlcm_onnx.compress(model, config)
    records = {record.name: record for record in result.report.tensors}
    assert records["W2"].encoding == "float16 copy" and records["W2"].compressed_bytes == 2 * 256 * 64
    assert records["W1"].encoding == "multi-codebook"
    stored = {t.name: t for t in result.model.graph.initializer}
    assert stored["W2.half"].data_type == onnx.TensorProto.FLOAT16 and "W2" not in stored
    ids = {"ids": np.array([0, 5, 511])}
    table, w1, w2 = (numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n))
                     for n in ("table", "W1", "W2"))
    expected = np.maximum(table[ids["ids"]] @ w1, 0) @ w2
    (compressed,) = run(result.model, ids)
    assert np.abs(compressed - expected).max() < 0.3 * np.abs(expected).max()
    assert float16_w2 in registered()


def test_the_size_planner_plans_a_registered_format(rng: np.random.Generator, float16_w2: Encoding) -> None:
    """A size target reads the new format's cost and error like any other: W2 stays float16, the rest meets the
    budget."""
    result = jlcm_onnx.compress(mlp_with_table(rng), CompressionConfig(min_elements=16, target_ratio=3.0))
    records = {record.name: record for record in result.report.tensors}
    assert records["W2"].encoding == "float16 copy"
    assert records["W1"].bits is not None and records["W1"].bits <= MAX_BITS


def test_the_affine_estimate_is_the_fused_layout_s_stored_bytes(rng: np.random.Generator) -> None:
    model = mlp_with_table(rng)
    config = CompressionConfig(bits=4, speed="fast", block_size=16, min_elements=16)
    result = jlcm_onnx.compress(model, config)
    record = next(r for r in result.report.tensors if r.name == "W1")
    assert "MatMulNBits" in record.decode_gate
    shape = WeightShape("W1", 64 * 256, 256, 2, False, 4, AffineBlocksFormat())
    assert AffineBlocksFormat().stored_bytes(shape, 4, 256, 0.0, config) == record.compressed_bytes


def test_the_affine_distortion_is_the_fit_s_error(rng: np.random.Generator) -> None:
    sample = rng.standard_normal((8, 64)).astype(np.float32)
    config = CompressionConfig(bits=4, speed="fast", block_size=16)
    errors = AffineBlocksFormat().squared_errors(sample, [2, 4], (8,), np.dtype(np.float16), config, 1)
    for bits in (2, 4):
        fitted = fit_affine_blocks(sample, bits, 16, np.dtype(np.float16))
        assert errors[bits] == pytest.approx(float(np.sum((fitted.decode().astype(np.float64) - sample) ** 2)))
    assert errors[2] > errors[4]
