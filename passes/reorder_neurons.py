"""Clusters the output neurons of each weight and re-orders them so every cluster is a contiguous group.

With G codebooks per tensor (the plan's groups for that tensor), a weight's rows are clustered by distribution
(:func:`jlcm_onnx.analysis.grouping.cluster_rows`, once per weight and group count for all the runs over a model) and
sorted by cluster with a permutation ``P``; the permutation is folded
into the graph (:mod:`jlcm_onnx.ir.permute_channels`): ``x @ (W P) = (x @ W) P`` and the next contraction's input
channels are permuted by ``P`` too, so the model computes the same function while each group of similar rows is a
contiguous range that shares one codebook, at no per-weight mapping cost. The group sizes go to the encoder through the
:class:`~jlcm_onnx.analysis.plan.CompressionPlan`.

Where the permutation cannot be folded (residual stream, attention heads, graph outputs, ...) the rows are still
clustered and stored re-ordered, and a Gather restores their order after decoding (``rows`` uint16/int32 indices and
one copy of the decoded weight, of a blocked MatMul's output, or of an embedding's looked-up ids); the reason is
recorded. Clustering raises the weight SQNR over the same number of contiguous groups in the original order
(``python bench/grouping.py``, README "grouping"). A weight whose rows were already permuted
as the sibling of another (the gate of a gated FFN shares the up projection's permutation) reuses that weight's groups
when it was planned with as many, and otherwise gets its own count as contiguous groups of the permuted rows.
"""

from __future__ import annotations

import numpy as np
import onnx

from jlcm_onnx.analysis.grouping import RowClusterings
from jlcm_onnx.analysis.plan import CompressionPlan, RowGrouping
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.codebook import equal_group_sizes
from jlcm_onnx.encodings.registry import encoding_for
from jlcm_onnx.ir.permute_channels import ChannelPaths, apply_permutation
from jlcm_onnx.ir.weight_sites import WeightSite, compressible_row_axis
from jlcm_onnx.passes.base import Pass, PassResult


class ReorderNeurons(Pass):
    """Clusters and re-orders output rows, folding the permutation into the graph; fills ``plan``."""

    needs = frozenset({"choices"})
    makes = frozenset({"groupings"})

    def __init__(self, config: CompressionConfig, plan: CompressionPlan,
                 clusterings: RowClusterings | None = None) -> None:
        self.config = config
        self.plan = plan
        self.clusterings = RowClusterings() if clusterings is None else clusterings

    def call(self, model: onnx.ModelProto) -> PassResult:
        if not self.config.reorder:
            return PassResult(model, modified=False)
        modified = False
        paths = ChannelPaths(model)
        sites = list(paths.sites.values())
        by_name = {site.name: site for site in sites}
        row_axes = {site.name: (compressible_row_axis(site, self.config)[0], len(site.shape)) for site in sites}
        for site in sites:
            row_axis = row_axes[site.name][0]
            if row_axis is None or site.name in self.plan.groupings:
                continue
            if not encoding_for(site, row_axis, self.config).groups_rows:
                continue
            rows = site.shape[row_axis]
            groups = self.plan.groups(site.name, rows, site.num_elements // rows)
            if not 1 < groups < rows:
                continue
            grouping, permuted_with = self._group(model, paths, site.name, site.array(), row_axis, groups, row_axes)
            self.plan.groupings[site.name] = grouping
            for sibling in permuted_with:
                self.plan.groupings[sibling] = RowGrouping(sibling, self._sibling_sizes(by_name[sibling], grouping,
                                                                                          groups, row_axes), True,
                                                           f"rows permuted with {site.name}")
            modified |= grouping.reordered
        return PassResult(model, modified=modified)

    def _sibling_sizes(
        self, sibling: WeightSite, grouping: RowGrouping, groups: int, row_axes: dict[str, tuple[int | None, int]]
    ) -> tuple[int, ...]:
        """The groups of a weight whose rows follow another's permutation: that weight's clusters when both were
        planned with the same group count, else the sibling's own count as contiguous groups of the permuted rows (so
        its codebooks cost what the size planner budgeted for it)."""
        rows = sibling.shape[row_axes[sibling.name][0]]
        own = self.plan.groups(sibling.name, rows, sibling.num_elements // rows)
        return grouping.sizes if own == groups else equal_group_sizes(rows, own)

    def _group(
        self,
        model: onnx.ModelProto,
        paths: ChannelPaths,
        name: str,
        weight: np.ndarray,
        row_axis: int,
        groups: int,
        row_axes: dict[str, tuple[int | None, int]],
    ) -> tuple[RowGrouping, list[str]]:
        rows = weight.shape[row_axis]
        matrix = np.moveaxis(weight, row_axis, 0).reshape(rows, -1)
        clusters = self.clusterings.cluster(name, matrix, groups)
        path = paths.find(name)
        if isinstance(path, str):
            note = f"stored re-ordered, restored by a Gather (cannot fold: {path})"
            return RowGrouping(name, clusters.sizes, False, note, clusters.permutation), []
        siblings = [
            tensor for tensor, axis in path.permuted[1:]
            if row_axes.get(tensor, (None, 0))[0] is not None and axis % row_axes[tensor][1] == row_axes[tensor][0]
        ]
        if any(sibling in self.plan.groupings for sibling in siblings):
            return RowGrouping(name, equal_group_sizes(rows, groups), False,
                               "original order: shares its permutation with an already grouped weight"), []
        apply_permutation(model, path, clusters.permutation)
        note = f"re-ordered, folded into {', '.join(path.contractions)}"
        return RowGrouping(name, clusters.sizes, True, note), siblings
