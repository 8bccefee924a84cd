"""What every weight format provides: the :class:`Encoding` interface and the types it reads and writes.

A format owns all that is particular to one way of storing a weight:

- which weights it takes under a config (:meth:`Encoding.selects`; the registry asks the formats in order and the
  first that takes a weight encodes it);
- its fit (:meth:`~Encoding.encode`, from the matrix and a request alone: what it needs of the graph is read first,
  :meth:`~Encoding.fit_options`), its learning against a layer's Gram ``H`` (:meth:`~Encoding.learn`) and an
  all-zero stand-in with the real encoding's arrays (:meth:`~Encoding.stand_in`, which sizes a file without fitting);
- its stored bytes as the size planner estimates them (:meth:`~Encoding.stored_bytes`) and the weight error of a row
  sample at each bit width (:meth:`~Encoding.squared_errors`);
- its decoder in the graph and the report's words for it (:meth:`~Encoding.write`);
- what the memory estimate needs: whether its fit or its learning must see the whole tensor at once;
- the opset and IR version its decoders need (:meth:`~Encoding.model_needs`), which the model is raised to first.

The pipeline holds no format-specific code: a new format is one module that subclasses :class:`Encoding` and one
:func:`~jlcm_onnx.encodings.registry.register` call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.codebook_decoder import DecodeGraph
from jlcm_onnx.ir.graph_building import ConstantPool, NameAllocator
from jlcm_onnx.ir.weight_sites import WeightSite

FLOAT16_MAX = float(np.finfo(np.float16).max)
FLOAT16_MIN_NORMAL = float(np.finfo(np.float16).tiny)


@dataclass(frozen=True)
class EncodeRequest:
    """What the plan asks of one weight's matrix [rows, cols]: ``bits`` per code, ``group_sizes`` (rows per group, in
    stored order), the codebook ``dtype``, the ``importance`` of each input (``diag(H)``; None data-free), the
    ``outlier_fraction``, ``chunk_weights`` (weights held in one chunk of rows, :mod:`jlcm_onnx.memory_budget`),
    the ``fit_options`` the format read from the graph for this weight (:meth:`Encoding.fit_options`), so that its fit
    needs no graph and can run in another process or on another machine, and whether every row keeps as many
    outliers (``outliers_per_row``: a table tied to a head, whose row decoders patch each row's own)."""

    bits: int
    group_sizes: tuple[int, ...]
    dtype: np.dtype
    importance: np.ndarray | None
    outlier_fraction: float
    chunk_weights: int
    fit_options: dict[str, Any] = field(default_factory=dict)
    outliers_per_row: bool = False


@dataclass(frozen=True)
class WeightShape:
    """What the size planner's cost of a weight depends on: its ``size`` and ``rows``, the bytes of one codebook
    value, whether it is decoded row by row only (an embedding table read by one Gather), the bytes of one of its
    original values, the format that encodes it, and whether it is stored a row at a time (such a table, with no
    outliers, or one tied to a head, with as many in every row: :func:`~jlcm_onnx.ir.weight_sites.is_row_packed`)."""

    name: str
    size: int
    rows: int
    codebook_bytes: int
    row_decoded: bool
    original_itemsize: int
    encoding: Encoding
    row_packed: bool = False


@dataclass(frozen=True)
class SiteEncoding:
    """A weight's ``encoded`` form (rows in stored order) in ``encoding``, its ``sqnr_db`` against the weight,
    ``restore`` (the permutation back to the original row order, ``None`` when rows are stored in order), whether it
    was ``learned`` from data and then the ``layer_error`` its learning reached. The dense matrix is not kept."""

    encoding: Encoding
    sqnr_db: float
    encoded: Any
    restore: np.ndarray | None
    learned: bool
    layer_error: float | None = None

    def decoded_weight(self, shape: tuple[int, ...], row_axis: int) -> np.ndarray:
        """The decoded weight in the layout of the original tensor (float32)."""
        decoded = self.encoded.decode()
        if self.restore is not None:
            decoded = decoded[self.restore]
        moved = (shape[row_axis], *(size for axis, size in enumerate(shape) if axis != row_axis))
        return np.moveaxis(decoded.reshape(moved), 0, row_axis)


@dataclass
class DecoderContext:
    """What a decoder is built with: fresh ``names``, the graph's shared constant ``pool``, the names of every
    initializer and weight (not run-time data, so never a gate's activation) and the run's config."""

    names: NameAllocator
    pool: ConstantPool
    constants: set[str]
    config: CompressionConfig


@dataclass(frozen=True)
class WrittenDecoder:
    """One weight's decoder: its nodes and stored tensors, the activation its decode gate is computed from (None:
    no gate), whether it stands in for the weight's reader node, the decoder-function kind it becomes one call of
    (:mod:`jlcm_onnx.ir.decoder_functions`; None: left inline), and the report's fields on it (bits, groups,
    encoding, outliers, decode gate).

    The reader is the weight's first (:func:`~jlcm_onnx.ir.weight_sites.anchor_index`) unless ``at_node`` gives the
    position of another in the weight's graph; ``drops`` are positions of nodes the decoder leaves unread (removed
    with it), and ``more`` are decoders of the same stored tensors standing in for the weight's other readers (a
    table's embedding Gather and its tied head)."""

    decoder: DecodeGraph
    gate_activation: str | None
    replaces_node: bool
    function: str | None
    record: dict[str, Any]
    at_node: int | None = None
    drops: tuple[int, ...] = ()
    more: tuple[WrittenDecoder, ...] = ()


class Encoding(ABC):
    """One weight format (see the module docstring)."""

    #: Whether the format stores rows in groups that the re-ordering pass may cluster and permute.
    groups_rows: ClassVar[bool] = True
    #: Whether the data-free fit needs all the tensor's weights at once (not one chunk of rows at a time).
    fits_whole_tensor: ClassVar[bool] = False
    #: Whether learning needs the whole tensor at once (not a block of row groups at a time).
    learns_whole_tensor: ClassVar[bool] = False

    def model_needs(self, config: CompressionConfig) -> tuple[int, int]:
        """The least ai.onnx opset and IR version this format's decoders need in a model compressed under
        ``config`` (``(0, 0)``: any the decoders run in)."""
        return 0, 0

    def vector_dim(self, config: CompressionConfig) -> int:
        """The inputs of a row that share one code under ``config`` (1: one code per weight)."""
        return 1

    @abstractmethod
    def selects(self, site: WeightSite, row_axis: int, config: CompressionConfig) -> bool:
        """Whether this format encodes ``site`` (rows along ``row_axis``) under ``config``."""

    def fit_options(self, site: WeightSite, row_axis: int, config: CompressionConfig) -> dict[str, Any]:
        """What :meth:`encode` needs to know of ``site``'s place in the graph (picklable values; none by default)."""
        return {}

    @abstractmethod
    def encode(self, matrix: np.ndarray, request: EncodeRequest, config: CompressionConfig) -> Any:
        """The data-free fit of ``matrix`` [rows, cols] (float32, rows in stored order)."""

    @abstractmethod
    def learn(self, matrix: np.ndarray, encoded: Any, gram: np.ndarray, config: CompressionConfig,
              device: str) -> tuple[Any, float]:
        """``encoded`` learned against the layer's output error ``tr((W - W^) H (W - W^)^T)``, and the objective
        reached (relative to ``tr(W H W^T)``)."""

    @abstractmethod
    def stand_in(self, rows: int, cols: int, request: EncodeRequest, site: WeightSite, row_axis: int,
                 config: CompressionConfig) -> Any:
        """An all-zero encoding with every array :meth:`encode` would make, in its shape and dtype."""

    @abstractmethod
    def stored_bytes(self, shape: WeightShape, bits: int, groups: int, outlier_fraction: float,
                     config: CompressionConfig) -> int:
        """The size planner's estimate of the bytes ``shape`` takes in the file at ``bits`` with ``groups``."""

    @abstractmethod
    def squared_errors(self, sample: np.ndarray, bit_widths: list[int], sizes: tuple[int, ...], dtype: np.dtype,
                       config: CompressionConfig, iterations: int) -> dict[int, float]:
        """``||W - W^||^2`` of a row sample encoded at each of ``bit_widths`` (the size planner's distortion)."""

    @abstractmethod
    def write(self, site: WeightSite, row_axis: int, encoding: SiteEncoding, context: DecoderContext) -> WrittenDecoder:
        """The decoder that gives ``site``'s reader its weight back (or stands in for the reader)."""


def codebook_dtype(config: CompressionConfig, data_type: int, matrix: np.ndarray | None = None) -> np.dtype:
    """The dtype a weight's codebook values (and scales and offsets) are stored in: float16 for a float16 weight
    (what its decoder reads); else the configured dtype, except float32 where float16 cannot hold the weights
    (overflow above 65504, or magnitudes lost in float16's subnormal range), which only a given ``matrix`` shows (the
    size planner, which reads no weights, assumes it can). ``data_type`` is the weight's ONNX element type."""
    if data_type == onnx.TensorProto.FLOAT16:
        return np.dtype(np.float16)
    if config.codebook_dtype == "float16" and matrix is not None:
        magnitude = max(-float(matrix.min(initial=0.0)), float(matrix.max(initial=0.0)))  # no |matrix| temporary
        if magnitude > FLOAT16_MAX or 0.0 < magnitude < FLOAT16_MIN_NORMAL * 1024:
            return np.dtype(np.float32)
    return np.dtype(config.codebook_dtype)
