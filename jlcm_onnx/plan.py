"""What each weight gets: its bits and groups (from the config, or per tensor from a size target) and how its rows
are grouped (from the re-ordering pass). One plan object is shared by the passes of a run, in pipeline order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jlcm_onnx.codebook import equal_group_sizes
from jlcm_onnx.config import CompressionConfig


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
    """Per-tensor choices (absent: the config's bits and groups) and row groupings (absent: equal contiguous groups)."""

    config: CompressionConfig
    choices: dict[str, TensorChoice] = field(default_factory=dict)
    groupings: dict[str, RowGrouping] = field(default_factory=dict)

    def choice(self, weight: str) -> TensorChoice:
        choice = self.choices.get(weight, TensorChoice(self.config.bits, self.config.groups))
        if choice.outlier_fraction is None:
            choice = TensorChoice(choice.bits, choice.groups, self.config.outlier_fraction)
        return choice

    def group_sizes(self, weight: str, rows: int) -> tuple[int, ...]:
        grouping = self.groupings.get(weight)
        return grouping.sizes if grouping is not None else equal_group_sizes(rows, self.choice(weight).groups)
