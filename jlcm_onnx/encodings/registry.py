"""The registered weight formats, and the one a weight gets: the first in order whose
:meth:`~jlcm_onnx.encodings.base.Encoding.selects` takes it.

Built in, in order: affine blocks (``speed="fast"``), multi-scaling, vector codebooks, input blocks,
multi-codebook. A new format is
registered with :func:`register` (``first=True`` to be asked before the built-in ones).
"""

from __future__ import annotations

from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.affine_format import AffineBlocksFormat
from jlcm_onnx.encodings.base import Encoding
from jlcm_onnx.encodings.codebook_formats import InputBlocks, MultiCodebook, MultiScaling
from jlcm_onnx.encodings.vector_format import VectorCodebook
from jlcm_onnx.ir.weight_sites import WeightSite

_REGISTERED: list[Encoding] = [AffineBlocksFormat(), MultiScaling(), VectorCodebook(), InputBlocks(), MultiCodebook()]


def register(encoding: Encoding, first: bool = False) -> Encoding:
    """Adds ``encoding`` to the formats :func:`encoding_for` asks: last, or with ``first`` before all others."""
    _REGISTERED.insert(0 if first else len(_REGISTERED), encoding)
    return encoding


def unregister(encoding: Encoding) -> None:
    _REGISTERED.remove(encoding)


def registered() -> tuple[Encoding, ...]:
    return tuple(_REGISTERED)


def model_needs(config: CompressionConfig) -> tuple[int, int]:
    """The least ai.onnx opset and IR version the registered formats' decoders need under ``config``."""
    needs = [encoding.model_needs(config) for encoding in _REGISTERED]
    return max(opset for opset, _ in needs), max(ir for _, ir in needs)


def encoding_for(site: WeightSite, row_axis: int, config: CompressionConfig) -> Encoding:
    """The format that encodes ``site`` (rows along ``row_axis``) under ``config``."""
    for encoding in _REGISTERED:
        if encoding.selects(site, row_axis, config):
            return encoding
    raise LookupError(f"no registered encoding takes {site.name} under this config")
