"""Permutes the output neurons of a weight and folds the permutation into the graph (docs/method.md, section 3).

A permutation ``p`` of ``C`` channels acts on an axis of length ``C * b`` in channel-major blocks of ``b``: new index
``i * b + r`` = old index ``p[i] * b + r``. Call this ``P`` (``b`` is 1 except after a Flatten/Reshape that merged the
channel with trailing dims, e.g. ``b = H * W`` for ``[N, C, H, W] -> [N, C*H*W]``). The invariances used:

* rows: ``x @ (W P) = (x @ W) P`` (MatMul, Gemm); ``conv(x, P W) = P conv(x, W)`` (Conv over output channels);
* contraction: ``(y P) @ (P^T V) = y @ V``: permuting a consumer's *input* channels like its input undoes ``P``
  (MatMul B axis -2, Gemm B axis 0 or 1 by ``transB``, Conv W axis 1 with ``group == 1``);
* channel-wise ops commute with ``P``: ``f(y P) = f(y) P`` for elementwise ``f`` (activations, the Erf and Tanh Gelu
  subgraphs), and ``(y P) + (c P) = (y + c) P`` for a constant ``c`` broadcast along the channel axis, which is
  permuted too (scalar or channel-broadcast constants stay as they are). The same holds for BatchNormalization
  (scale, bias, mean, var), pooling, a depthwise Conv (weight rows and bias), LayerNormalization over exactly the
  channel axis (mean and variance are permutation-invariant; scale and bias permuted), and a Flatten/Reshape that keeps
  each channel a contiguous block (the block size grows).

The path is found by :mod:`jlcm_onnx.ir.channel_search`; ``apply_permutation`` then permutes every tensor of the
path, and the model's outputs are unchanged up to rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from jlcm_onnx.errors import ModelError
from jlcm_onnx.ir.channel_search import CONTRACTIONS, ChannelPath, ChannelSearch
from jlcm_onnx.ir.graph_index import Blocked, GraphIndex, stored_tensors
from jlcm_onnx.ir.lazy_weights import tensor_array
from jlcm_onnx.ir.weight_sites import find_weight_sites, weight_row_axis


def find_channel_path(model: onnx.ModelProto, weight: str) -> ChannelPath | str:
    """The tensors to permute so that permuting ``weight``'s output rows leaves the model's outputs unchanged, or the
    reason it can't (a one-line string naming the blocking node/op)."""
    return ChannelPaths(model).find(weight)


class ChannelPaths:
    """:func:`find_channel_path` for many weights of one model: its weights and graph are indexed once. Permuting
    tensors (:func:`apply_permutation`) keeps the index valid; editing the graph's nodes does not."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.sites = {site.name: site for site in find_weight_sites(model)}
        self._index: GraphIndex | None = None  # built at the first search: shape inference is the costly part

    def find(self, weight: str) -> ChannelPath | str:
        site = self.sites.get(weight)
        if site is None:
            return f"{weight} is not a float initializer or Constant of the model"
        if site.graph is not self.model.graph:
            return f"{weight} lives inside a subgraph (If/Loop/Scan body); only main-graph weights are permuted"
        if any(c.graph is not site.graph for c in site.consumers):
            return f"{weight} is read inside an If/Loop/Scan body; only weights read by main-graph nodes are permuted"
        readers = [(c, weight_row_axis(c, site.shape)) for c in site.consumers]
        if any(c.node.op_type == "Gather" and axis is not None for c, axis in readers):
            return f"{weight} is a Gather table: its rows are looked up by id"
        other = next((c.node.op_type for c, axis in readers if axis is not None and c.node.op_type not in CONTRACTIONS),
                     None)
        if other is not None:
            return f"{weight} is read by {other}: only the output channels of a MatMul/Gemm/Conv/ConvTranspose re-order"
        readers = [(c, axis) for c, axis in readers if axis is not None]
        if not readers:
            return f"{weight} is not the weight input of a MatMul/Gemm/Conv/ConvTranspose"
        consumer, row_axis = readers[0]
        if self._index is None:
            self._index = GraphIndex(self.model)
        try:
            return ChannelSearch(self._index, consumer.node_index, site.shape[row_axis]).run(weight)
        except Blocked as blocked:
            return blocked.reason


def apply_permutation(model: onnx.ModelProto, path: ChannelPath, permutation: np.ndarray) -> None:
    """Permutes, in place, every tensor of ``path`` by ``permutation`` (new row i = old row ``permutation[i]``)."""
    permutation = np.asarray(permutation)
    if permutation.shape != (path.channels,) or not np.array_equal(np.sort(permutation), np.arange(path.channels)):
        raise ValueError(f"expected a permutation of {path.channels} channels, got an array of shape "
                         f"{permutation.shape}")
    tensors = stored_tensors(model.graph)
    for (name, axis), block in zip(path.permuted, path.blocks, strict=True):
        if name not in tensors:
            raise ModelError(f"tensor {name} of the channel path of {path.weight} is not in the model")
        proto = tensors[name]
        index = (permutation[:, None] * block + np.arange(block)).ravel()
        permuted = np.take(tensor_array(proto), index, axis=axis)
        proto.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(permuted), name))






