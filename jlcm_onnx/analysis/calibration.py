"""Calibration data: real model inputs, read from any of the usual formats, checked against the model, sub-sampled.

:func:`load_calibration` turns a *source* into :class:`CalibrationData`, a list of *samples* (feed dicts: model input
name -> ``np.ndarray``) that all fit the model. Sources:

- a ``.npz`` file: one feed, keyed by model input names (``np.savez("calib.npz", input_ids=ids, attention_mask=m)``);
- a folder: read like an unzipped ``.npz``: files ``<input name>.npy`` together form one feed, and every ``*.npz`` file
  is one more feed (files in name order; other files are ignored);
- a dict of input name -> array: one feed;
- any other iterable of such dicts (a list, a generator, a ``torch`` DataLoader yielding numpy arrays);
- an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()`` returning a feed dict, then ``None``), so
  readers written for ``onnxruntime.quantization`` work unchanged;
- a :class:`CalibrationData` (checked again against the given model, sub-sampled again).

**What a sample is.** Every feed is split along axis 0 (the batch axis):

- when every model input has a symbolic (dynamic) dim 0, a sample is one item along axis 0 (kept with a leading axis
  of length 1), and :meth:`CalibrationData.batches` concatenates samples back into batches, grouping samples of equal
  shapes (text inputs padded to different sequence lengths cannot be concatenated);
- when every model input has the same fixed dim 0 ``B``, a sample is a slice of ``B`` items; ``batches`` yields one
  sample per run;
- otherwise (scalar inputs, mixed batch dims) a sample is a feed as given.

**Checked before any work**, each failure one line naming the feed, the input and the mismatch: missing and unknown
input names, element types (exactly the model's: ``float64`` data for a ``float32`` input is an error, not a silent
cast), rank and fixed dims, equal lengths along the batch axis, and NaN/Inf in float inputs.

**Padding.** An input that marks real positions (an attention mask: ``attention_mask`` is found automatically, or
name one with ``mask=``) leaves its zero positions out of the statistics: padded tokens are not what the model sees
in use, and a batch padded to a fixed length would otherwise weigh them in every layer's Gram
(:mod:`jlcm_onnx.analysis.statistics`). ``mask=None`` counts every position.

**Sub-sampling.** When there are more than ``samples`` samples, ``samples`` of them are drawn without replacement with
``numpy.random.default_rng(seed)`` and kept in their original order, so equal data, ``samples`` and ``seed`` give the
same calibration set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx

from jlcm_onnx.analysis.calibration_files import read_feed_files
from jlcm_onnx.errors import CalibrationError, ConfigError
from jlcm_onnx.ir.model_load import load_model
from jlcm_onnx.ir.sessions import first_line
from jlcm_onnx.ir.synthetic_inputs import declared_inputs

#: Samples kept by default (the CLI's ``--calibration-samples``).
DEFAULT_SAMPLES = 128
#: ``load_calibration(mask=AUTO_MASK)`` finds an input named ``attention_mask``.
AUTO_MASK = "auto"

DYNAMIC, FIXED, WHOLE = "dynamic", "fixed", "whole"

Feed = dict[str, np.ndarray]


@runtime_checkable
class FeedReader(Protocol):
    """onnxruntime's ``CalibrationDataReader`` protocol: ``get_next()`` returns a feed dict, or ``None`` at the end."""

    def get_next(self) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class InputSpec:
    """A model input as the calibration data must match it: ``None`` dims are symbolic, ``shape=None`` is unknown."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.dtype} of any shape"
        return f"{self.dtype} [{', '.join('?' if d is None else str(d) for d in self.shape)}]"


def model_inputs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The inputs a feed must provide: graph inputs that are not initializers, with numpy dtype and shape."""
    specs = []
    for declared in declared_inputs(model):
        if not declared.tensor:
            raise CalibrationError(f"model input '{declared.name}' is not a tensor; only tensor inputs can be fed")
        if declared.dtype is None:
            raise CalibrationError(f"model input '{declared.name}' has no known element type")
        shape = None if declared.dims is None else tuple(d if isinstance(d, int) else None for d in declared.dims)
        specs.append(InputSpec(declared.name, declared.dtype, shape))
    return tuple(specs)


def batch_mode(inputs: tuple[InputSpec, ...]) -> tuple[str, int]:
    """(how feeds are split into samples: DYNAMIC, FIXED or WHOLE, the items per sample along axis 0)."""
    if not inputs or any(spec.shape is None or len(spec.shape) == 0 for spec in inputs):
        return WHOLE, 0
    leading = {spec.shape[0] for spec in inputs}
    if leading == {None}:
        return DYNAMIC, 1
    if len(leading) == 1:
        return FIXED, int(leading.pop())
    return WHOLE, 0


class CalibrationData:
    """Checked, sub-sampled samples for one model; iterate for the samples, :meth:`batches` for batched feeds."""

    def __init__(self, inputs: tuple[InputSpec, ...], samples: list[Feed], available: int, seed: int,
                 mask: str | None = None) -> None:
        self.inputs = inputs
        self.samples = samples
        self.available = available
        self.seed = seed
        self.mask = mask
        self.mode, self.items_per_sample = batch_mode(inputs)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Feed]:
        return iter(self.samples)

    def __repr__(self) -> str:
        return f"CalibrationData({len(self)} of {self.available} samples, seed={self.seed}, batch={self.mode})"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    def positions(self) -> tuple[int, int]:
        """(positions the mask marks as real, all positions) over the samples; (0, 0) without a mask."""
        if self.mask is None:
            return 0, 0
        real = sum(int(np.count_nonzero(sample[self.mask])) for sample in self.samples)
        return real, sum(sample[self.mask].size for sample in self.samples)

    def batches(self, batch_size: int = 32) -> Iterator[Feed]:
        """Feeds of up to ``batch_size`` samples concatenated along axis 0 when the model's batch dim is dynamic.

        Samples are grouped by their shapes (in order of each shape's first sample, then in sample order), so only
        compatible arrays are concatenated; with a fixed or no batch dim every sample is one feed as it is.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "a positive integer")
        if self.mode != DYNAMIC or batch_size == 1:
            yield from self.samples
            return
        groups: dict[tuple, list[Feed]] = {}
        for sample in self.samples:
            groups.setdefault(tuple(sample[name].shape for name in self.input_names), []).append(sample)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                yield {name: np.concatenate([s[name] for s in chunk], axis=0) for name in self.input_names}


#: What :func:`load_calibration` reads (see the module docstring).
CalibrationSource = (
    str | os.PathLike | Mapping[str, Any] | Iterable[Mapping[str, Any]] | FeedReader | CalibrationData
)


def load_calibration(
    source: CalibrationSource,
    model: onnx.ModelProto | str | os.PathLike,
    samples: int | None = DEFAULT_SAMPLES,
    seed: int = 0,
    mask: str | None = AUTO_MASK,
) -> CalibrationData:
    """Reads, checks and sub-samples calibration data for ``model`` (a ``ModelProto`` or the path of one).

    Args:
        source: see the module docstring for the formats.
        model: the model the data is fed to; only its graph inputs are read.
        samples: the most samples kept (drawn with ``seed`` when there are more); ``None`` keeps all.
        seed: seed of the sub-sampling.
        mask: the integer or bool input whose zero positions are padding, left out of the statistics; ``"auto"``: the
            input named ``attention_mask`` if there is one (any case); ``None``: no mask.

    Raises:
        CalibrationError: the data cannot be read or does not fit the model (one line naming input and mismatch).
        ConfigError: ``samples`` or ``seed`` is not a valid value.
    """
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ConfigError("samples", samples, "a positive integer or None")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", seed, "a non-negative integer")
    inputs = model_inputs(read_graph(model))
    if not inputs:
        raise CalibrationError("the model has no inputs to feed")
    mask = _mask_input(inputs, mask)
    mode, items = batch_mode(inputs)
    split: list[Feed] = []
    for label, feed in _read_feeds(source):
        checked = _check_feed(label, feed, inputs, batch_multiple=mode == FIXED)
        split.extend(_split(label, checked, inputs, mode, items))
    if not split:
        raise CalibrationError("the calibration data holds no samples")
    available = len(split)
    if samples is not None and available > samples:
        keep = np.sort(np.random.default_rng(seed).choice(available, size=samples, replace=False))
        split = [split[int(i)] for i in keep]
    return CalibrationData(inputs, split, available, seed, mask)


def at_real_positions(array: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    """The vectors of ``array`` (its last axis) at the positions ``real`` marks (bool, a mask ``!= 0``), when its
    leading axes are those positions ([batch, sequence, features] under a [batch, sequence] mask, or a flattened
    [batch * sequence, features]): [real positions, features]. Else, or when every position is real, ``array`` itself
    (a tensor whose axes do not line up with the mask is not a per-position one); no copy then."""
    picked = real_rows(array, real)
    return array if picked is None else array.reshape(-1, array.shape[-1])[picked]


def real_rows(array: np.ndarray, real: np.ndarray | None) -> np.ndarray | None:
    """Indices of the rows of ``array.reshape(-1, array.shape[-1])`` at real positions (see :func:`at_real_positions`);
    None when all of them count (no mask, every position real, or axes that do not line up with the mask)."""
    if real is None or real.all() or not lines_up(array, real):
        return None
    return np.flatnonzero(real)


def lines_up(array: np.ndarray, real: np.ndarray) -> bool:
    """Whether ``array``'s leading axes are the positions of the mask ``real`` (see :func:`at_real_positions`)."""
    return array.shape[:-1] == real.shape or (array.ndim == 2 and array.shape[0] == real.size)


def _mask_input(inputs: tuple[InputSpec, ...], mask: str | None) -> str | None:
    if mask == AUTO_MASK:
        return next((spec.name for spec in inputs if spec.name.lower() == "attention_mask"
                     and (spec.dtype.kind in "iub")), None)
    if mask is None:
        return None
    spec = next((spec for spec in inputs if spec.name == mask), None)
    if spec is None:
        names = ", ".join(spec.name for spec in inputs)
        raise CalibrationError(f"mask input '{mask}' is not an input of the model (it has {names})")
    if spec.dtype.kind not in "iub":
        raise CalibrationError(f"mask input '{mask}' is {spec.dtype}, not an integer or bool mask")
    return mask


# ---------------------------------------------------------------------------------------------------------- reading


def read_graph(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """The model itself, or the model at a path with its large weights left in their files (enough for its inputs;
    raises the standard :class:`ModelError` naming the problem)."""
    if isinstance(model, onnx.ModelProto):
        return model
    return load_model(model)[0]


def _read_feeds(source: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(a label naming the feed in error messages, the feed) for every feed of ``source``."""
    if isinstance(source, CalibrationData):
        for index, sample in enumerate(source):
            yield f"calibration sample {index}", sample
    elif isinstance(source, (str, os.PathLike)):
        yield from read_feed_files(Path(source))
    elif isinstance(source, Mapping):
        yield "calibration feed 0", source
    elif isinstance(source, FeedReader):
        index = 0
        while (feed := source.get_next()) is not None:
            yield f"calibration feed {index}", _as_mapping(f"calibration feed {index}", feed)
            index += 1
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, np.ndarray)):
        for index, feed in enumerate(source):
            yield f"calibration feed {index}", _as_mapping(f"calibration feed {index}", feed)
    else:
        raise CalibrationError(
            f"calibration data of type {type(source).__name__} is not supported: give a .npz file, a folder of "
            ".npy/.npz files, a dict or an iterable of dicts of input name -> array, or a reader with get_next()"
        )


def _as_mapping(label: str, feed: Any) -> Mapping[str, Any]:
    if not isinstance(feed, Mapping):
        raise CalibrationError(f"{label} is a {type(feed).__name__}, expected a dict of input name -> array")
    return feed


# ---------------------------------------------------------------------------------------------------------- checks


def _check_feed(label: str, feed: Mapping[str, Any], inputs: tuple[InputSpec, ...], batch_multiple: bool) -> Feed:
    names = [spec.name for spec in inputs]
    unknown = [str(key) for key in feed if key not in names]
    if unknown:
        raise CalibrationError(f"{label}: '{unknown[0]}' is not an input of the model (inputs: {', '.join(names)})")
    missing = [name for name in names if name not in feed]
    if missing:
        given = ", ".join(map(str, feed)) or "nothing"
        raise CalibrationError(f"{label}: model input '{missing[0]}' is missing (the feed has: {given})")
    checked = {}
    for spec in inputs:
        array = feed[spec.name]
        if not isinstance(array, np.ndarray):
            try:
                array = np.asarray(array)
            except (TypeError, ValueError, RuntimeError) as error:
                raise CalibrationError(f"{label}: input '{spec.name}' is not an array: {first_line(error)}") from None
        if array.dtype != spec.dtype:
            raise CalibrationError(
                f"{label}: input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}")
        _check_shape(label, spec, array.shape, batch_multiple)
        if np.issubdtype(array.dtype, np.floating) or array.dtype.kind == "c":
            _check_finite(label, spec.name, array)
        checked[spec.name] = array
    return checked


def _check_shape(label: str, spec: InputSpec, shape: tuple[int, ...], batch_multiple: bool) -> None:
    """Rank and fixed dims; with ``batch_multiple`` dim 0 may hold any positive multiple of the model's batch size."""
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise CalibrationError(f"{label}: input '{spec.name}' has shape {list(shape)} (rank {len(shape)}), the model "
                               f"expects rank {len(spec.shape)}: {spec.describe()}")
    for axis, (got, expected) in enumerate(zip(shape, spec.shape, strict=True)):
        if expected is None or got == expected:
            continue
        if axis == 0 and batch_multiple:
            if got > 0 and got % expected == 0:
                continue
            raise CalibrationError(f"{label}: input '{spec.name}' has {got} items along axis 0, not a multiple of the "
                                   f"model's batch size {expected}")
        raise CalibrationError(f"{label}: input '{spec.name}' has shape {list(shape)}, the model expects "
                                   f"{spec.describe()} (dim {axis} is {got}, expected {expected})")


def _check_finite(label: str, name: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if finite.all():
        return
    nan = int(np.isnan(array).sum())
    bad = f"{nan} NaN value(s)" if nan else f"{int((~finite).sum())} Inf value(s)"
    raise CalibrationError(f"{label}: input '{name}' contains {bad}")


def _split(label: str, feed: Feed, inputs: tuple[InputSpec, ...], mode: str, items: int) -> list[Feed]:
    if mode == WHOLE:
        return [feed]
    lengths = {name: array.shape[0] for name, array in feed.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name}: {length}" for name, length in lengths.items())
        raise CalibrationError(f"{label}: inputs have different lengths along the batch axis 0 ({listed})")
    length = next(iter(lengths.values()))
    if length == 0:
        raise CalibrationError(f"{label}: input '{inputs[0].name}' has no items (axis 0 has length 0)")
    # FIXED: _check_shape let through multiples of the model's batch size along axis 0 only.
    return [{name: array[start:start + items] for name, array in feed.items()} for start in range(0, length, items)]
