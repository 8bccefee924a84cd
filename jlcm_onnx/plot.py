"""A compressed model's per-layer encodings as a picture: stored bits per weight and error, tensor by tensor.

Top panel: each compressed tensor's stored bits per weight (codes, codebooks, maps, outliers and block scales over its
element count), coloured by format. Bottom panel: its SQNR in dB (``10 log10(||W||^2 / ||W - W^||^2)``) and, for
tensors learned on calibration data, the layer's relative output error. Tensors are in graph order, labelled with
their layer (:attr:`jlcm_onnx.report.TensorRecord.layer`). Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import math
from pathlib import Path

from jlcm_onnx.errors import JlcmError
from jlcm_onnx.pipeline.describe import ModelDescription
from jlcm_onnx.report import format_bytes

#: Most characters of a tensor's label on the x axis.
LABEL_CHARS = 40


def plot_encodings(description: ModelDescription, path: str | Path) -> None:
    """Writes the picture of a compressed model's ``description`` to ``path`` (format from its suffix: .png, .svg,
    .pdf). Raises :class:`JlcmError` for an uncompressed model or without matplotlib."""
    if not description.compressed:
        raise JlcmError("--plot draws a compressed model's encodings; this model is not compressed by jlcm-onnx")
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
        from matplotlib.patches import Patch
    except ImportError:
        raise JlcmError("--plot needs matplotlib: pip install 'jlcm-onnx[plot]'") from None
    tensors = description.tensors
    positions = range(len(tensors))
    bits = [8 * t["compressed_bytes"] / max(math.prod(t["shape"]), 1) for t in tensors]
    formats = sorted({t.get("encoding") or "-" for t in tensors})
    colours = {name: matplotlib.colormaps["tab10"](i % 10) for i, name in enumerate(formats)}
    width = min(max(6.0, 0.18 * len(tensors)), 40.0)
    figure, (top, bottom) = pyplot.subplots(2, 1, sharex=True, figsize=(width, 7), constrained_layout=True)
    top.bar(positions, bits, color=[colours[t.get("encoding") or "-"] for t in tensors])
    top.set_ylabel("stored bits per weight")
    top.legend(handles=[Patch(color=colours[f], label=f) for f in formats], fontsize="small", loc="upper right")
    top.set_title(f"{len(tensors)} compressed tensors, {format_bytes(description.file_bytes)} file")
    sqnr = [t.get("sqnr_db") for t in tensors]
    bottom.plot([i for i, v in zip(positions, sqnr, strict=True) if v is not None], [v for v in sqnr if v is not None],
                "o-", markersize=3, label="SQNR (dB)")
    bottom.set_ylabel("SQNR (dB)")
    errors = [t.get("layer_error") for t in tensors]
    if any(e is not None for e in errors):
        right = bottom.twinx()
        right.plot([i for i, e in zip(positions, errors, strict=True) if e is not None],
                   [e for e in errors if e is not None], "s", color="tab:red", markersize=3)
        right.set_ylabel("layer output error (relative)", color="tab:red")
    labels = [(t.get("layer") or t["name"])[:LABEL_CHARS] for t in tensors]
    bottom.set_xticks(list(positions), labels, rotation=90, fontsize=6)
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
