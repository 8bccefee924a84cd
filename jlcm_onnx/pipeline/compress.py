"""The public entry point: ``compress(model, config) -> CompressionResult`` and ``save``.

The pipeline is one visible list of passes (:mod:`jlcm_onnx.pipeline.pass_list`) run on a private copy of the input
(the input is never modified), once, or until a size target is met (:mod:`jlcm_onnx.pipeline.target_runs`). The
result records its settings in its metadata (:mod:`jlcm_onnx.pipeline.metadata`), is checked (full ``onnx.checker``,
an onnxruntime load and a numeric spot check against the original) before it is returned, and carries a per-tensor
report.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from jlcm_onnx.analysis.calibration import AUTO_MASK, DEFAULT_SAMPLES, CalibrationData, load_calibration
from jlcm_onnx.analysis.plan import CompressionPlan, TensorChoice, override_choices
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.devices import check_device, cpu_cores, execution_providers, torch_device
from jlcm_onnx.encodings.base import WeightShape
from jlcm_onnx.encodings.row_block_learning import LEARNING_BLOCK_WEIGHTS
from jlcm_onnx.errors import JlcmError
from jlcm_onnx.ir.model_load import check_input, load_model, quantization_note
from jlcm_onnx.ir.model_save import save_model, serialized_bytes
from jlcm_onnx.ir.output_check import check_output, reference_for
from jlcm_onnx.ir.segmented_run import SEGMENT_BYTES, weight_bytes
from jlcm_onnx.memory_budget import (
    Segmented,
    check_budget,
    chunk_weights,
    default_max_memory,
    estimated_peak,
    peak_rss,
    release_freed_memory,
)
from jlcm_onnx.pipeline.balanced_speed import plan_speeds
from jlcm_onnx.pipeline.metadata import check_not_compressed
from jlcm_onnx.pipeline.pass_list import run_passes
from jlcm_onnx.pipeline.run_costs import RunCosts, with_estimated_ns
from jlcm_onnx.pipeline.size_target import tensor_cost, weight_shapes
from jlcm_onnx.pipeline.target_runs import resolve_target, run_to_target
from jlcm_onnx.progress import Phase
from jlcm_onnx.report import CompressionReport, format_bytes


@dataclass
class CompressionResult:
    """The compressed model and what was done to it."""

    model: onnx.ModelProto
    report: CompressionReport
    source: Path | None = None

    def save(self, path: str | os.PathLike) -> int:
        """Writes the model atomically (never over the input file) and returns the bytes written."""
        return save(self, path)


#: A warning is noted when less than this share of the calibration positions is real (the rest padding).
PADDING_WARNING = 0.5


def compress(
    model: str | os.PathLike | onnx.ModelProto,
    config: CompressionConfig | None = None,
    calibration: Any = None,
    *,
    progress: bool = False,
    device: str = "cpu",
    force: bool = False,
) -> CompressionResult:
    """Compresses the float weights of an ONNX model into codebooks and bit-packed indices.

    Args:
        model: path of an ``.onnx`` file (external data is read from its folder) or a ``ModelProto`` (not modified).
        config: compression settings; ``CompressionConfig()`` (4 bits, one codebook per output row) if None.
        calibration: calibration inputs (see :func:`jlcm_onnx.load_calibration` for the formats; at most 128 samples
            are used, drawn with the config's seed): codebooks and mappings are then learned per layer to minimise the
            layer's output error. None compresses data-free.
        progress: show a progress bar on stderr.
        device: ``"cpu"`` or ``"cuda"``: where calibration runs in onnxruntime and the learning in torch (checked
            first: asking for CUDA without it is a :class:`JlcmError`).
        force: compress a model that jlcm-onnx already compressed (its metadata says so) rather than refuse it with a
            :class:`JlcmError`; only the float weights left dense can shrink.

    Returns:
        The compressed model (valid ONNX, loads in stock onnxruntime) and its report.

    Example:
        >>> result = compress("minilm.onnx", CompressionConfig(bits=4))  # doctest: +SKIP
        >>> result.report.ratio  # doctest: +SKIP
        6.8
        >>> result.save("minilm-4bit.onnx")  # doctest: +SKIP
    """
    config = _checked_request(config, calibration, device)
    started = time.perf_counter()
    source, original_bytes = load_model(model)
    if not force:
        check_not_compressed(source)
    check_input(source, config)
    budget = config.max_memory or default_max_memory()
    chunk = chunk_weights(budget, config.workers or cpu_cores())
    check_budget(_estimated_peak(source, original_bytes, config, chunk, calibrated=calibration is not None), budget)
    with Phase("running the original on synthetic inputs", enabled=progress):
        reference = reference_for(source, config.seed, None if isinstance(model, onnx.ModelProto) else Path(model))
    data = None if calibration is None else _calibration_data(calibration, source, config)
    notes = [note for note in (quantization_note(source), _segments_note(source, data is not None)) if note]
    target = None if config.target is None else resolve_target(source, original_bytes, config, progress, data,
                                                                  device)
    run_config = _with_planned_speeds(source, config, progress, notes)
    loaded = [source]  # the first run consumes this copy; a size target's later runs read the input again
    del source  # so the input's weights are in memory once

    def load() -> onnx.ModelProto:
        return loaded.pop() if loaded else load_model(model)[0]

    if target is None:
        plan = CompressionPlan(run_config, override_choices(loaded[0], run_config), device=device,
                               chunk_weights=chunk)
        run = run_passes(load(), run_config, plan, progress, data)
    else:
        run, plan = run_to_target(load, target, config, progress, data, device, chunk)
    working = run.model
    release_freed_memory()
    notes.extend([*run.notes, *_run_notes(config, plan, data)])
    with Phase("checking the output (onnx.checker, onnxruntime load, spot check)", enabled=progress):
        spot_note = check_output(working, reference)
    notes.extend([spot_note] if spot_note else [])
    costs = RunCosts.packaged()
    report = CompressionReport(
        tensors=[with_estimated_ns(record, costs, config.affine_block_size) for record in run.tensors],
        original_file_bytes=original_bytes,
        compressed_file_bytes=serialized_bytes(working),
        config=config.to_dict(),
        seconds=time.perf_counter() - started,
        notes=notes,
        memory_budget=budget,
        peak_rss=peak_rss(),
        passes=run.log,
    )
    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    return CompressionResult(working, report, source)


def _estimated_peak(source: onnx.ModelProto, model_bytes: int, config: CompressionConfig, chunk: int,
                    calibrated: bool) -> int:
    """The run's peak memory estimated from the shapes (:func:`jlcm_onnx.memory_budget.estimated_peak`)."""
    shapes = weight_shapes(source, config)
    unchunked = max((shape.size for shape in shapes if shape.encoding.fits_whole_tensor), default=0)
    learned = max((shape.size if shape.encoding.learns_whole_tensor else min(shape.size, LEARNING_BLOCK_WEIGHTS)
                   for shape in shapes if not shape.row_decoded), default=0) if calibrated else 0
    grams = sorted((shape.size // shape.rows) ** 2 * 8 for shape in shapes) if calibrated else []
    workers = config.workers or cpu_cores()
    if weight_bytes(source) <= SEGMENT_BYTES:
        return estimated_peak(model_bytes, chunk, workers, unchunked, learned, sum(grams), calibrated)
    largest = max((shape.size * shape.original_itemsize for shape in shapes), default=0)
    segmented = Segmented(_estimated_output(source, model_bytes, shapes, config), largest, SEGMENT_BYTES)
    return estimated_peak(model_bytes, chunk, workers, unchunked, learned, sum(grams[-workers:]), calibrated,
                          segmented)


def _estimated_output(source: onnx.ModelProto, model_bytes: int, shapes: list[WeightShape],
                      config: CompressionConfig) -> int:
    """The output's bytes: a size target's, else the formats' estimate at the config's (or overrides') settings."""
    if config.target_size is not None:
        return config.target_size
    if config.target_ratio is not None:
        return int(model_bytes / config.target_ratio)
    choices = override_choices(source, config)
    default = TensorChoice(config.bits, config.groups)
    dense = model_bytes - sum(shape.size * shape.original_itemsize for shape in shapes)
    return dense + sum(tensor_cost(shape, choices.get(shape.name, default), config) for shape in shapes)


def _checked_request(config: CompressionConfig | None, calibration: Any, device: str) -> CompressionConfig:
    """The config (the default one for None), after checking its type and, with calibration, that the device can
    run: before any work."""
    config = config or CompressionConfig()
    if not isinstance(config, CompressionConfig):
        raise JlcmError(f"config must be a CompressionConfig, got {type(config).__name__}")
    check_device(device)
    if calibration is not None:
        execution_providers(device)
        torch_device(device)
    return config


def _calibration_data(calibration: Any, source: onnx.ModelProto, config: CompressionConfig) -> CalibrationData:
    """The calibration inputs checked against ``source``; a :class:`CalibrationData` keeps all its samples."""
    given = isinstance(calibration, CalibrationData)
    return load_calibration(calibration, source, samples=None if given else DEFAULT_SAMPLES, seed=config.seed,
                            mask=calibration.mask if given else AUTO_MASK)


def _segments_note(source: onnx.ModelProto, calibrated: bool) -> str | None:
    """Where onnxruntime ran the input a segment at a time (:mod:`jlcm_onnx.ir.segmented_run`), None elsewhere."""
    if weight_bytes(source) <= SEGMENT_BYTES:
        return None
    what = "the output check and the calibration statistics (Grams kept in temporary files once final)" if (
        calibrated) else "the output check"
    return (f"memory: {format_bytes(weight_bytes(source))} of weights: onnxruntime ran the model a segment of at most "
            f"{format_bytes(SEGMENT_BYTES)} of weights at a time for {what}")


def _with_planned_speeds(source: onnx.ModelProto, config: CompressionConfig, progress: bool,
                         notes: list[str]) -> CompressionConfig:
    """The config a run writes with: under speed 'balanced', each fused weight's speed as an override (the plan's note
    added to ``notes``); else ``config``."""
    if config.speed != "balanced":
        return config
    speeds = plan_speeds(source, config, progress)
    notes.append(speeds.note)
    return config.with_tensor_speeds(speeds.fast)


def _run_notes(config: CompressionConfig, plan: CompressionPlan, data: CalibrationData | None) -> list[str]:
    """The report's notes on how the run went: decoding at load, and the calibration's samples, passes and mask."""
    notes = []
    if config.decode_at_load:
        notes.append("decode_at_load: the decoders that would run on every run have no run-time gate; onnxruntime "
                     "decodes those weights once at load (dense latency and memory for them)")
    if data is not None:
        mode = "sequential" if config.sequential else "on the float model"
        notes.append(f"calibration: {len(data)} samples, onnxruntime passes: {plan.calibration_passes} ({mode})")
        notes.extend(_padding_notes(data))
    return notes


def save(result: CompressionResult, path: str | os.PathLike) -> int:
    """Writes a compressed model atomically and records the bytes written in its report."""
    written = save_model(result.model, path, protect=result.source)
    result.report.compressed_file_bytes = written
    return written


def _padding_notes(data: CalibrationData) -> list[str]:
    """What the calibration mask left out, and a warning when most positions were padding."""
    real, total = data.positions()
    if data.mask is None:
        return ["calibration: every position counted (no attention mask)"]
    notes = [f"calibration: {real:,} of {total:,} positions used ({total - real:,} padding positions of "
             f"'{data.mask}' left out)"]
    if real < PADDING_WARNING * total:
        notes.append(f"warning: {1 - real / total:.0%} of the calibration positions are padding: pack or trim the "
                     "calibration text to use the statistics' batches on real tokens")
    return notes


