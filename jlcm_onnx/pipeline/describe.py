"""Describes a model's weights: for a compressed model, how each tensor is encoded; for any other model, which float
tensors the default configuration would compress and why the others would be left alone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import onnx

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.ir.model_load import load_model
from jlcm_onnx.ir.weight_sites import compressible_row_axis, find_weight_sites
from jlcm_onnx.pipeline.metadata import read_metadata
from jlcm_onnx.report import align_columns, format_bytes


@dataclass(frozen=True)
class ModelDescription:
    file_bytes: int
    compressed: bool
    format_version: str | None
    config: dict[str, Any] | None
    tensors: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file_bytes": self.file_bytes,
            "compressed": self.compressed,
            "format_version": self.format_version,
            "config": self.config,
            "tensors": self.tensors,
        }

    def _codebook_values(self, tensor: dict[str, Any]) -> int:
        """The values a compressed tensor's codebooks hold: ``G 2^b``, or ``G 2^(b d) d`` for vector codebooks."""
        dim = self.config.get("vector_dim", 1) if (tensor.get("encoding") or "").startswith("vector") else 1
        return (tensor["groups"] << tensor["bits"] * dim) * dim

    def format_table(self) -> str:
        if self.compressed:
            header = ("tensor", "layer", "shape", "bits", "format", "groups", "codebook values", "original", "stored")
            rows = [
                (t["name"], t.get("layer") or "-", _shape(t["shape"]), str(t["bits"]), t.get("encoding") or "-",
                 _or_dash(t["groups"]),
                 "-" if t["groups"] is None else str(self._codebook_values(t)),
                 format_bytes(t["original_bytes"]), format_bytes(t["compressed_bytes"]))
                for t in self.tensors
            ]
            title = f"jlcm-onnx compressed model (format {self.format_version}), {format_bytes(self.file_bytes)}"
        else:
            header = ("tensor", "layer", "shape", "dtype", "bytes", "with default config")
            rows = [(t["name"], t["layer"], _shape(t["shape"]), t["dtype"], format_bytes(t["bytes"]), t["plan"])
                    for t in self.tensors]
            title = f"uncompressed model, {format_bytes(self.file_bytes)}, {len(rows)} float tensors"
        return "\n".join([title, *align_columns([header, *rows])])


def describe_model(source: str | os.PathLike | onnx.ModelProto) -> ModelDescription:
    model, file_bytes = load_model(source)
    metadata = read_metadata(model)
    if metadata is not None:
        return ModelDescription(file_bytes, True, metadata["format_version"], metadata["config"], metadata["tensors"])
    config = CompressionConfig()
    tensors = []
    for site in find_weight_sites(model):
        row_axis, reason = compressible_row_axis(site, config)
        tensors.append({
            "name": site.name,
            "layer": site.layer,
            "shape": list(site.shape),
            "dtype": onnx.helper.tensor_dtype_to_string(site.tensor.data_type).removeprefix("TensorProto."),
            "bytes": site.array().nbytes,
            "plan": "compress" if row_axis is not None else f"skip: {reason}",
        })
    return ModelDescription(file_bytes, False, None, None, tensors)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"
