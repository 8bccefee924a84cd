"""What a compressed model records about itself in ``metadata_props`` (keys under ``jlcm_onnx.``): the on-disk format
version, the settings it was compressed with, and each compressed tensor's encoding; and the refusal to compress
such a model again unless forced.
"""

from __future__ import annotations

import json
import math
from typing import Any

import onnx

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.errors import JlcmError
from jlcm_onnx.report import TensorRecord

#: Version of the on-disk encoding (packed codes, codebooks and decoder layout), stored in ``metadata_props``.
FORMAT_VERSION = "3"  # 2: decoders are calls of model-local functions (domain jlcm); 3: codes of 2, 4 and 8 bits
#                         of a weight decoded whole are stored in code slots, read a byte at a time


METADATA_PREFIX = "jlcm_onnx."


def check_not_compressed(model: onnx.ModelProto) -> None:
    """Raises :class:`JlcmError` when ``model`` carries jlcm-onnx's metadata: its weights are codes already."""
    metadata = read_metadata(model)
    if metadata is not None:
        compressed = sum(1 for tensor in metadata["tensors"] if tensor.get("bits") is not None)
        raise JlcmError(f"the input was already compressed by jlcm-onnx ({compressed} tensors encoded, metadata format "
                        f"{metadata['format_version']}); compressing it again shrinks only the weights left dense: "
                        "pass --force (force=True) to do it anyway")


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


def _rounded(value: float | None, digits: int) -> float | None:
    """``value`` for JSON: rounded, None when absent or not finite (an exact tensor's SQNR)."""
    return None if value is None or not math.isfinite(value) else round(value, digits)


def write_metadata(model: onnx.ModelProto, config: CompressionConfig, records: list[TensorRecord]) -> None:
    tensors = [
        {"name": r.name, "layer": r.layer, "shape": list(r.shape), "dtype": r.dtype, "bits": r.bits, "groups": r.groups,
         "encoding": r.encoding, "outliers": r.outliers,
         "original_bytes": r.original_bytes, "compressed_bytes": r.compressed_bytes,
         "sqnr_db": _rounded(r.sqnr_db, 2), "layer_error": _rounded(r.layer_error, 6)}
        for r in records if r.bits is not None
    ]
    values = {
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.encoding_settings(), sort_keys=True),
        "tensors": json.dumps(tensors, separators=(",", ":")),
    }
    kept = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=f"{METADATA_PREFIX}{key}", value=value)
