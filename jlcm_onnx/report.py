"""What a compression run did to every float tensor, as data, JSON and a table.

Sizes are bytes: ``original_bytes`` of a tensor is its dense storage, ``compressed_bytes`` what is stored in its
place (packed codes, codebooks, row-to-group map). The whole-file ratio uses the serialized sizes of the input and
output models, i.e. the bytes written (decoder nodes and shared constants included), not an estimate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

COMPRESSED = "compressed"
SKIPPED = "skipped"


@dataclass(frozen=True)
class TensorRecord:
    """One float tensor of the model and what happened to it (``layer``: where it is read, as the exporter's module
    path and the op, e.g. ``layers.3.query (MatMul)``; ``layer_error``: with calibration, the layer's relative output
    error on the calibration inputs, ``tr(ΔW H ΔW^T) / tr(W H W^T)``, see :mod:`jlcm_onnx.encodings.learning`;
    ``estimated_ns``: the estimated time of its product, decode included, at one token, from the package's cost model
    (:mod:`jlcm_onnx.pipeline.run_costs`; none for a table decoded at the looked-up rows only, or a weight neither
    fused nor decoded on every run)."""

    name: str
    consumers: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    original_bytes: int
    status: str
    reason: str = ""
    layer: str = ""
    compressed_bytes: int | None = None
    bits: int | None = None
    groups: int | None = None
    encoding: str | None = None
    row_order: str | None = None
    outliers: int | None = None
    sqnr_db: float | None = None
    layer_error: float | None = None
    decode_gate: str | None = None
    estimated_ns: float | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["consumers"], values["shape"] = list(self.consumers), list(self.shape)
        if self.sqnr_db is not None and math.isinf(self.sqnr_db):
            values["sqnr_db"] = None  # exact; JSON has no infinity
            values["exact"] = True
        return values


@dataclass(frozen=True)
class PassLog:
    """One pass of a run: its class name, its wall time and whether it changed the model."""

    name: str
    seconds: float
    modified: bool


@dataclass
class CompressionReport:
    """Per-tensor records, whole-file sizes, the settings used, and the memory budget and peak resident set size of
    the process (bytes; the peak is the whole process's, so an API caller's own use counts in it)."""

    tensors: list[TensorRecord]
    original_file_bytes: int
    compressed_file_bytes: int
    config: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)
    memory_budget: int | None = None
    peak_rss: int | None = None
    passes: list[PassLog] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.original_file_bytes / max(self.compressed_file_bytes, 1)

    @property
    def compressed(self) -> list[TensorRecord]:
        return [t for t in self.tensors if t.status == COMPRESSED]

    def to_dict(self) -> dict[str, Any]:
        compressed = self.compressed
        return {
            "original_file_bytes": self.original_file_bytes,
            "compressed_file_bytes": self.compressed_file_bytes,
            "ratio": round(self.ratio, 4),
            "compressed_tensors": len(compressed),
            "skipped_tensors": len(self.tensors) - len(compressed),
            "compressed_weight_bytes": {
                "original": sum(t.original_bytes for t in compressed),
                "compressed": sum(t.compressed_bytes or 0 for t in compressed),
            },
            "seconds": round(self.seconds, 3),
            "memory": {"budget_bytes": self.memory_budget, "peak_rss_bytes": self.peak_rss},
            "config": self.config,
            "notes": self.notes,
            "passes": [{"name": p.name, "seconds": round(p.seconds, 3), "modified": p.modified} for p in self.passes],
            "tensors": [t.to_dict() for t in self.tensors],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self, skipped: bool = False) -> str:
        """A plain-text table of the compressed tensors (and the skipped ones, with reasons, if asked); "est. us": the
        estimated time of the tensor's product at one token (:attr:`TensorRecord.estimated_ns`)."""
        rows = [("tensor", "layer", "shape", "bits", "groups", "format", "original", "compressed", "ratio", "SQNR dB",
                 "est. us")]
        for t in self.compressed:
            sqnr = "exact" if t.sqnr_db is not None and math.isinf(t.sqnr_db) else f"{t.sqnr_db:.1f}"
            ratio = t.original_bytes / max(t.compressed_bytes or 1, 1)
            shape = "x".join(map(str, t.shape))
            rows.append((t.name, t.layer or "-", shape, str(t.bits), "-" if t.groups is None else str(t.groups),
                         t.encoding or "-", format_bytes(t.original_bytes), format_bytes(t.compressed_bytes or 0),
                         f"{ratio:.2f}x", sqnr, "-" if t.estimated_ns is None else f"{t.estimated_ns / 1e3:.1f}"))
        lines = align_columns(rows)
        if skipped:
            lines.append("")
            lines.extend(f"skipped {t.name}{f' ({t.layer})' if t.layer else ''}: {t.reason}"
                         for t in self.tensors if t.status == SKIPPED)
        lines.append("")
        lines.append(
            f"file: {format_bytes(self.original_file_bytes)} -> {format_bytes(self.compressed_file_bytes)} "
            f"({self.ratio:.2f}x smaller), {len(self.compressed)} tensors compressed, "
            f"{len(self.tensors) - len(self.compressed)} left as they were, {self.seconds:.1f} s"
            + ("" if self.peak_rss is None else f", peak memory {format_bytes(self.peak_rss)}")
            + ("" if self.memory_budget is None else f" (budget {format_bytes(self.memory_budget)})")
        )
        return "\n".join(lines)


def format_bytes(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def align_columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
