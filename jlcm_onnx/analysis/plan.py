"""What each weight gets: its bits and groups (from the config, or per tensor from a size target) and how its rows
are grouped (from the re-ordering pass). One plan object is shared by the passes of a run, in pipeline order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from jlcm_onnx.analysis.statistics import LayerStatistics
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.codebook import equal_group_sizes
from jlcm_onnx.encodings.vector_format import vector_groups
from jlcm_onnx.ir.weight_sites import find_weight_sites
from jlcm_onnx.memory_budget import MAX_CHUNK_WEIGHTS

#: Per-row codebooks ("groups=None") pool rows whose weights number fewer than this many codebooks' entries.
MIN_CODEBOOK_SPAN = 1


@dataclass(frozen=True)
class TensorChoice:
    """Bits per index, codebooks (or scales) per tensor (``None``: one per output row), and the fraction of weights
    kept as outliers (``None``: the config's)."""

    bits: int
    groups: int | None
    outlier_fraction: float | None = None


@dataclass(frozen=True)
class RowGrouping:
    """How the rows of ``weight`` are grouped: ``sizes`` of the contiguous groups, whether the re-ordering was folded
    into the graph, and, when it was not, ``stored_order`` (encoded row i = original row ``stored_order[i]``)."""

    weight: str
    sizes: tuple[int, ...]
    reordered: bool
    note: str
    stored_order: np.ndarray | None = None


@dataclass
class CompressionPlan:
    """Per-tensor choices (absent: the config's bits and groups), row groupings (absent: equal contiguous groups),
    calibration statistics (absent: data-free, k-means codebooks only), the encodings already made by sequential
    calibration (absent: the encoder makes them) with the layer errors their learning reached, how many onnxruntime
    passes the calibration ran, the device (``"cpu"`` or ``"cuda"``) of the calibration runs and the learning, and the
    weights an encoder may hold in one chunk of rows (:mod:`jlcm_onnx.memory_budget`)."""

    config: CompressionConfig
    choices: dict[str, TensorChoice] = field(default_factory=dict)
    groupings: dict[str, RowGrouping] = field(default_factory=dict)
    statistics: dict[str, LayerStatistics] = field(default_factory=dict)
    encodings: dict[str, Any] = field(default_factory=dict)  # each a format's encoded value
    layer_errors: dict[str, float] = field(default_factory=dict)
    calibration_passes: int = 0
    device: str = "cpu"
    chunk_weights: int = MAX_CHUNK_WEIGHTS

    def choice(self, weight: str) -> TensorChoice:
        choice = self.choices.get(weight, TensorChoice(self.config.bits, self.config.groups))
        if choice.outlier_fraction is None:
            choice = TensorChoice(choice.bits, choice.groups, self.config.outlier_fraction)
        return choice

    def groups(self, weight: str, rows: int, cols: int) -> int:
        """The tensor's group count: its choice, where ``None`` is one per row unless rows hold fewer weights than a
        codebook has entries (a 3x3 depthwise row has 9 weights: a codebook of 16 values per row would cost more than
        the weights); then rows are pooled so each codebook spans at least its number of entries. Vector codebooks
        pool rows by default (:func:`~jlcm_onnx.encodings.vector_format.vector_groups`)."""
        choice = self.choice(weight)
        if choice.groups is not None:
            return min(choice.groups, rows)
        dim = self.config.vector_dim
        if dim > 1 and cols % dim == 0:
            return vector_groups(rows, cols, choice.bits, dim)
        span = MIN_CODEBOOK_SPAN << choice.bits
        return rows if cols >= span else max(1, rows * cols // span)

    def group_sizes(self, weight: str, rows: int, cols: int) -> tuple[int, ...]:
        grouping = self.groupings.get(weight)
        return grouping.sizes if grouping is not None else equal_group_sizes(rows, self.groups(weight, rows, cols))


def override_choices(model: onnx.ModelProto, config: CompressionConfig) -> dict[str, TensorChoice]:
    """The choices the config's per-tensor overrides give the weights they pick (see
    :attr:`~jlcm_onnx.config.CompressionConfig.overrides`); the other weights keep the config's."""
    if not config.overrides:
        return {}
    choices = {}
    for site in find_weight_sites(model):
        settings = config.override_settings(site.name, {consumer.node.op_type for consumer in site.consumers})
        if settings:
            choices[site.name] = TensorChoice(settings.get("bits", config.bits), settings.get("groups", config.groups),
                                              settings.get("outlier_fraction"))
    return choices
