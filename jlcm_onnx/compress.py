"""The public entry point: ``compress(model, config) -> CompressionResult`` and ``save``.

The pipeline is one visible list of passes run on a private copy of the input (the input is never modified). The result
is checked (full ``onnx.checker`` and an onnxruntime load) before it is returned, and carries a per-tensor report.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.errors import JlcmError
from jlcm_onnx.model_io import check_input, check_output, load_model, save_model
from jlcm_onnx.passes.base import Pass
from jlcm_onnx.passes.encode_weights import EncodeWeights
from jlcm_onnx.passes.reorder_neurons import GroupPlan, ReorderNeurons
from jlcm_onnx.report import CompressionReport, TensorRecord

#: Version of the on-disk encoding (packed codes, codebooks and decoder layout), stored in ``metadata_props``.
FORMAT_VERSION = "1"
METADATA_PREFIX = "jlcm_onnx."


@dataclass
class CompressionResult:
    """The compressed model and what was done to it."""

    model: onnx.ModelProto
    report: CompressionReport
    source: Path | None = None

    def save(self, path: str | os.PathLike) -> int:
        """Writes the model atomically (never over the input file) and returns the bytes written."""
        return save(self, path)


def build_pipeline(config: CompressionConfig, progress: bool) -> list[Pass]:
    """The passes of a compression run, in order; the re-ordering pass hands its group sizes to the encoder."""
    plan = GroupPlan()
    return [ReorderNeurons(config, plan), EncodeWeights(config, plan, progress=progress)]


def compress(
    model: str | os.PathLike | onnx.ModelProto,
    config: CompressionConfig | None = None,
    calibration: Any = None,
    *,
    progress: bool = False,
) -> CompressionResult:
    """Compresses the float weights of an ONNX model into codebooks and bit-packed indices.

    Args:
        model: path of an ``.onnx`` file (external data is read from its folder) or a ``ModelProto`` (not modified).
        config: compression settings; ``CompressionConfig()`` (4 bits, one codebook per output row) if None.
        calibration: reserved for calibrated compression; must be None in this version (data-free only).
        progress: show a progress bar on stderr.

    Returns:
        The compressed model (valid ONNX, loads in stock onnxruntime) and its report.

    Example:
        >>> result = compress("minilm.onnx", CompressionConfig(bits=4))  # doctest: +SKIP
        >>> result.report.ratio  # doctest: +SKIP
        6.8
        >>> result.save("minilm-4bit.onnx")  # doctest: +SKIP
    """
    config = config or CompressionConfig()
    if not isinstance(config, CompressionConfig):
        raise JlcmError(f"config must be a CompressionConfig, got {type(config).__name__}")
    if calibration is not None:
        raise JlcmError("calibration data is not supported yet: this version compresses data-free")
    started = time.perf_counter()
    working, original_bytes = load_model(model)
    check_input(working)
    records: list[TensorRecord] = []
    for graph_pass in build_pipeline(config, progress):
        result = graph_pass(working)
        working = result.model
        records.extend(r for r in result.records if isinstance(r, TensorRecord))
    _write_metadata(working, config, records)
    check_output(working)
    report = CompressionReport(
        tensors=records,
        original_file_bytes=original_bytes,
        compressed_file_bytes=working.ByteSize(),
        config=config.to_dict(),
        seconds=time.perf_counter() - started,
    )
    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    return CompressionResult(working, report, source)


def save(result: CompressionResult, path: str | os.PathLike) -> int:
    """Writes a compressed model atomically and records the bytes written in its report."""
    written = save_model(result.model, path, protect=result.source)
    result.report.compressed_file_bytes = written
    return written


def read_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The compression settings and per-tensor encodings stored in a compressed model, or None for other models."""
    props = {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}
    if not props:
        return None
    return {
        "format_version": props.get(f"{METADATA_PREFIX}format_version"),
        "config": json.loads(props.get(f"{METADATA_PREFIX}config", "{}")),
        "tensors": json.loads(props.get(f"{METADATA_PREFIX}tensors", "[]")),
    }


def _write_metadata(model: onnx.ModelProto, config: CompressionConfig, records: list[TensorRecord]) -> None:
    tensors = [
        {"name": r.name, "shape": list(r.shape), "dtype": r.dtype, "bits": r.bits, "groups": r.groups,
         "encoding": r.encoding,
         "outliers": r.outliers,
         "original_bytes": r.original_bytes, "compressed_bytes": r.compressed_bytes}
        for r in records if r.bits is not None
    ]
    values = {
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "tensors": json.dumps(tensors, separators=(",", ":")),
    }
    kept = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=f"{METADATA_PREFIX}{key}", value=value)
