"""The public entry point: ``compress(model, config) -> CompressionResult`` and ``save``.

The pipeline is one visible list of passes run on a private copy of the input (the input is never modified). The result
is checked (full ``onnx.checker``, an onnxruntime load and a numeric spot check against the original) before it is
returned, and carries a per-tensor report.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from jlcm_onnx.analysis.calibration import AUTO_MASK, DEFAULT_SAMPLES, CalibrationData, load_calibration
from jlcm_onnx.analysis.grouping import RowClusterings
from jlcm_onnx.analysis.plan import CompressionPlan, TensorChoice, override_choices
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.devices import check_device, cpu_cores, execution_providers, torch_device
from jlcm_onnx.encodings.affine_decoder import required_ir_version, required_opset
from jlcm_onnx.encodings.base import WeightShape
from jlcm_onnx.encodings.row_block_learning import LEARNING_BLOCK_WEIGHTS
from jlcm_onnx.errors import JlcmError
from jlcm_onnx.ir.lazy_weights import materialize
from jlcm_onnx.ir.model_load import check_input, load_model, quantization_note
from jlcm_onnx.ir.model_save import save_model
from jlcm_onnx.ir.output_check import check_output, reference_for
from jlcm_onnx.ir.runtime import fold_at_load
from jlcm_onnx.memory_budget import (
    MAX_CHUNK_WEIGHTS,
    check_budget,
    chunk_weights,
    default_max_memory,
    estimated_peak,
    peak_rss,
    release_freed_memory,
)
from jlcm_onnx.passes.base import Pass
from jlcm_onnx.passes.calibrate_sequentially import CalibrateSequentially
from jlcm_onnx.passes.collect_statistics import CollectStatistics
from jlcm_onnx.passes.encode_weights import EncodeWeights
from jlcm_onnx.passes.manager import PassManager, PipelineRun
from jlcm_onnx.passes.reorder_neurons import ReorderNeurons
from jlcm_onnx.passes.stand_in_encodings import StandInEncodings
from jlcm_onnx.passes.strip_debug_metadata import StripDebugMetadata
from jlcm_onnx.passes.untie_heads import UntieHeads
from jlcm_onnx.passes.upgrade_opset import UpgradeOpset
from jlcm_onnx.pipeline.distortion import ErrorTable, estimate_errors
from jlcm_onnx.pipeline.sensitivity import output_sensitivities, weight_errors
from jlcm_onnx.pipeline.size_target import (
    adjust_fine,
    largest_cost,
    plan_for_budget,
    smallest_cost,
    total_cost,
    weight_shapes,
)
from jlcm_onnx.progress import Phase
from jlcm_onnx.report import CompressionReport, TensorRecord

#: Version of the on-disk encoding (packed codes, codebooks and decoder layout), stored in ``metadata_props``.
FORMAT_VERSION = "2"  # 2: decoders are calls of model-local functions (domain jlcm)
METADATA_PREFIX = "jlcm_onnx."
#: Rehearsals of a size target's choices on stand-in encodings (:mod:`jlcm_onnx.passes.stand_in_encodings`),
#: which measure the file exactly in a fraction of a run's time; the second one almost always lands within 1%.
MAX_REHEARSALS = 4
#: Real compression runs allowed to converge on a size target (the first one lands when a rehearsal did).
MAX_TARGET_RUNS = 4
#: A size target's runs aim this share of the goal (half a percent under it).
AIM = 0.995


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


def build_pipeline(
    config: CompressionConfig, plan: CompressionPlan, progress: bool, data: CalibrationData | None = None,
    rehearsal: bool = False, clusterings: RowClusterings | None = None,
) -> list[Pass]:
    """The passes of a compression run, in order; the re-ordering pass hands its group sizes to the encoder, and with
    calibration data the statistics of the re-ordered model's layers go to the encoder's joint learning. A
    ``rehearsal`` encodes stand-ins instead (no data used): the same file layout and bytes, nothing fitted. With
    ``speed="fast"`` the model's opset is first raised to what DequantizeLinear with blocks needs, and tables tied to
    a language-model head get a copy for the head, and the exporter's debug metadata goes last (unless
    ``keep_debug_metadata``). Runs over one model share its row ``clusterings``."""
    upgrade: list[Pass] = []
    if config.speed == "fast":
        upgrade = [UpgradeOpset(required_opset(config.bits), required_ir_version(config.bits)), UntieHeads(config)]
    if rehearsal:
        middle: list[Pass] = [StandInEncodings(config, plan)]
    else:
        calibration = CalibrateSequentially if config.sequential else CollectStatistics
        middle = [] if data is None else [calibration(config, plan, data, progress)]
    reorder = ReorderNeurons(config, plan, clusterings)
    strip: list[Pass] = [] if config.keep_debug_metadata else [StripDebugMetadata()]
    return [*upgrade, reorder, *middle, EncodeWeights(config, plan, progress=progress), *strip]


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
    config = config or CompressionConfig()
    if not isinstance(config, CompressionConfig):
        raise JlcmError(f"config must be a CompressionConfig, got {type(config).__name__}")
    check_device(device)
    if calibration is not None:  # fail before any work when the device cannot run
        execution_providers(device)
        torch_device(device)
    started = time.perf_counter()
    source, original_bytes = load_model(model)
    if not force:
        _check_not_compressed(source)
    check_input(source, config)
    budget = config.max_memory or default_max_memory()
    chunk = chunk_weights(budget, cpu_cores())
    check_budget(_estimated_peak(source, original_bytes, config, chunk, calibrated=calibration is not None), budget)
    with Phase("running the original on synthetic inputs", enabled=progress):
        reference = reference_for(source, config.seed, None if isinstance(model, onnx.ModelProto) else Path(model))
    data = None
    if calibration is not None:  # a CalibrationData is re-checked against this model but keeps all its samples
        given = isinstance(calibration, CalibrationData)
        data = load_calibration(calibration, source, samples=None if given else DEFAULT_SAMPLES, seed=config.seed,
                                mask=calibration.mask if given else AUTO_MASK)
    notes = [note for note in (quantization_note(source),) if note]
    target = None if config.target is None else _resolve_target(source, original_bytes, config, progress, data,
                                                                  device)
    loaded = [source]  # the first run consumes this copy; a size target's later runs read the input again
    del source  # so the input's weights are in memory once

    def load() -> onnx.ModelProto:
        return loaded.pop() if loaded else load_model(model)[0]

    if target is None:
        plan = CompressionPlan(config, override_choices(loaded[0], config), device=device, chunk_weights=chunk)
        run = _run(load(), config, plan, progress, data)
    else:
        run, plan = _run_to_target(load, target, config, progress, data, device, chunk)
    working = run.model
    release_freed_memory()
    notes.extend(run.notes)
    if config.decode_at_load:
        notes.append("decode_at_load: the decoders that would run on every run have no run-time gate; onnxruntime "
                     "decodes those weights once at load (dense latency and memory for them)")
    if data is not None:
        mode = "sequential" if config.sequential else "on the float model"
        notes.append(f"calibration: {len(data)} samples, onnxruntime passes: {plan.calibration_passes} ({mode})")
        notes.extend(_padding_notes(data))
    with Phase("checking the output (onnx.checker, onnxruntime load, spot check)", enabled=progress):
        spot_note = check_output(working, reference)
    notes.extend([spot_note] if spot_note else [])
    report = CompressionReport(
        tensors=run.tensors,
        original_file_bytes=original_bytes,
        compressed_file_bytes=working.ByteSize(),
        config=config.to_dict(),
        seconds=time.perf_counter() - started,
        notes=notes,
        memory_budget=budget,
        peak_rss=peak_rss(),
        passes=run.log,
    )
    source = None if isinstance(model, onnx.ModelProto) else Path(model)
    return CompressionResult(working, report, source)


def _run(
    source: onnx.ModelProto,
    config: CompressionConfig,
    plan: CompressionPlan,
    progress: bool,
    data: CalibrationData | None = None,
    rehearsal: bool = False,
    clusterings: RowClusterings | None = None,
) -> PipelineRun:
    """One run of the pipeline over ``source``, which it consumes (edits in place or replaces), with metadata
    written: the compressed model (a fresh message), its tensor records, the notes of the passes and what ran."""
    manager = PassManager(build_pipeline(config, plan, progress, data, rehearsal, clusterings))
    held = [source]
    del source  # the manager holds the only reference: a pass that returns a new model frees the old one
    run = manager.run(held.pop())
    if config.decode_at_load:
        fold_at_load(run.model)
    _write_metadata(run.model, config, run.tensors)
    compact = onnx.ModelProto()  # a fresh message: the input's buffers, which the edited one still holds, can go
    compact.CopyFrom(run.model)
    run.model = compact
    return run


@dataclass(frozen=True)
class _Target:
    """A size target resolved against the input: the goal in bytes, the bytes outside the compressed tensors
    (``fixed``), the shapes and measured option errors of the tensors, the first per-tensor choices and the row
    clusterings met so far (which every run reuses)."""

    kind: str
    value: float
    goal: float
    fixed: int
    shapes: list[WeightShape]
    errors: ErrorTable
    choices: dict[str, TensorChoice]
    clusterings: RowClusterings

    @property
    def aim(self) -> float:
        return AIM * self.goal


def _resolve_target(
    source: onnx.ModelProto, original_bytes: int, config: CompressionConfig, progress: bool,
    data: CalibrationData | None, device: str,
) -> _Target:
    """The config's size target for ``source``: the goal, the option errors (weighed by their effect on the outputs
    with calibration data) and the planner's first choices; a goal out of reach is a :class:`JlcmError`."""
    shapes = weight_shapes(source, config)
    kind, value = config.target
    if kind == "target_bits_per_weight":
        goal, fixed = value / 8 * sum(s.size for s in shapes), 0
    else:
        goal = value if kind == "target_size" else original_bytes / value
        fixed = original_bytes - sum(s.size * s.original_itemsize for s in shapes)
    lowest, highest = fixed + smallest_cost(shapes, config), fixed + largest_cost(shapes, config)
    if not lowest <= goal <= highest:
        raise JlcmError(
            f"{kind}={value} asks for {goal:,.0f} bytes, outside what can be reached: {lowest:,.0f} (1 bit, one "
            f"codebook per tensor) to {highest:,.0f} (8 bits, one codebook per row)" + _unit(kind)
        )
    clusterings = RowClusterings()
    if data is None:
        errors = estimate_errors(source, config, progress, clusterings)
    else:  # weigh each tensor's error by what it does to the outputs; the option table (mostly Python) is measured
        # beside the output probes (onnxruntime), which leave part of the cores idle
        with ThreadPoolExecutor(max_workers=1) as beside:
            table = beside.submit(estimate_errors, source, config, False, clusterings)
            coefficients = output_sensitivities(source, config, data, execution_providers(device), progress)
            errors = weight_errors(table.result(), coefficients)
    choices = plan_for_budget(shapes, int(AIM * goal - fixed), config, errors)
    return _Target(kind, value, goal, fixed, shapes, errors, choices, clusterings)


def _run_to_target(
    load: Callable[[], onnx.ModelProto],
    target: _Target,
    config: CompressionConfig,
    progress: bool,
    data: CalibrationData | None = None,
    device: str = "cpu",
    chunk: int = MAX_CHUNK_WEIGHTS,
) -> tuple[PipelineRun, CompressionPlan]:
    """Compresses with per-tensor bits and groups chosen to meet the config's size target within 1%; returns the
    last run (the target's note first among its notes) and its plan.

    The planner budgets the tensors' stored bytes; the rest of the file (graph, decoders, uncompressed tensors) is
    measured after each run and the budget corrected, aiming half a percent under the target. The choices are first
    rehearsed on stand-in encodings, which measure the file exactly in a fraction of a run's time, until they land;
    then the real run (with calibration and learning) makes the same bytes. Every run works on its own copy of the
    input from ``load`` and consumes it, so one copy is in memory at a time.
    """
    goal, fixed, shapes, choices = target.goal, target.fixed, target.shapes, target.choices
    rehearsed = runs = 0
    landed = False  # a rehearsal met the target: the real run next, with the same choices
    for attempt in range(MAX_REHEARSALS + MAX_TARGET_RUNS):
        rehearsal = runs == 0 and not landed and rehearsed < MAX_REHEARSALS
        plan = CompressionPlan(config, choices=choices, device=device, chunk_weights=chunk)
        run = None  # the previous run's model goes before the next copy comes
        release_freed_memory()
        with Phase(f"size target: rehearsal {rehearsed + 1} on stand-in encodings", enabled=progress and rehearsal):
            run = _run(load(), config, plan, progress and not rehearsal, data, rehearsal, target.clusterings)
        if fixed:
            materialize(run.model)  # the weights left dense count as they will be written
        achieved = run.model.ByteSize() if fixed else sum(r.compressed_bytes or 0 for r in run.tensors)
        rehearsed, runs = rehearsed + rehearsal, runs + (not rehearsal)
        if 0.99 * goal <= achieved <= goal:
            if not rehearsal:
                break
            landed = True
            continue
        # fine: change group counts only, so the decoders (and their bytes) stay as measured; else coarse: re-plan
        # with the bytes the planner did not see (graph, uncompressed tensors, its own estimates)
        adjusted, unabsorbed = adjust_fine(shapes, choices, int(target.aim - achieved), config)
        if attempt > 0 and abs(unabsorbed) < 0.004 * goal:
            choices = adjusted
        else:
            spent = int(target.aim - (achieved - total_cost(shapes, choices, config)))
            choices = plan_for_budget(shapes, spent, config, target.errors)
    else:
        raise JlcmError(f"could not meet {target.kind}={target.value}: {achieved:,.0f} bytes for a goal of "
                        f"{goal:,.0f}")
    note = (f"{target.kind}={target.value}: goal {goal:,.0f} bytes, achieved {achieved:,} ({achieved / goal - 1:+.2%})"
            f" after {rehearsed} rehearsal{'s' if rehearsed != 1 else ''} and {runs} run{'s' if runs != 1 else ''}")
    run.notes.insert(0, note)
    return run, plan


def _estimated_peak(source: onnx.ModelProto, model_bytes: int, config: CompressionConfig, chunk: int,
                    calibrated: bool) -> int:
    """The run's peak memory estimated from the shapes (:func:`jlcm_onnx.memory_budget.estimated_peak`)."""
    shapes = weight_shapes(source, config)
    unchunked = max((shape.size for shape in shapes if shape.encoding.fits_whole_tensor), default=0)
    learned = max((shape.size if shape.encoding.learns_whole_tensor else min(shape.size, LEARNING_BLOCK_WEIGHTS)
                   for shape in shapes if not shape.row_decoded), default=0) if calibrated else 0
    grams = sum((shape.size // shape.rows) ** 2 * 8 for shape in shapes) if calibrated else 0
    return estimated_peak(model_bytes, chunk, cpu_cores(), unchunked, learned, grams, calibrated)


def _unit(kind: str) -> str:
    return " bytes of stored weights" if kind == "target_bits_per_weight" else " bytes of file"


def save(result: CompressionResult, path: str | os.PathLike) -> int:
    """Writes a compressed model atomically and records the bytes written in its report."""
    written = save_model(result.model, path, protect=result.source)
    result.report.compressed_file_bytes = written
    return written


def _check_not_compressed(model: onnx.ModelProto) -> None:
    """Raises :class:`JlcmError` when ``model`` carries jlcm-onnx's metadata: its weights are codes already."""
    metadata = read_metadata(model)
    if metadata is not None:
        compressed = sum(1 for tensor in metadata["tensors"] if tensor.get("bits") is not None)
        raise JlcmError(f"the input was already compressed by jlcm-onnx ({compressed} tensors encoded, metadata format "
                        f"{metadata['format_version']}); compressing it again shrinks only the weights left dense: "
                        "pass --force (force=True) to do it anyway")


def read_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The compression settings and per-tensor encodings stored in a compressed model, or None for other models."""
    props = {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}
    if not props:
        return None
    return {
        "format_version": props.get(f"{METADATA_PREFIX}format_version"),
        "config": json.loads(props.get(f"{METADATA_PREFIX}config", "{}")),
        "tensors": json.loads(props.get(f"{METADATA_PREFIX}tensors", "[]")),
    }


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


def _rounded(value: float | None, digits: int) -> float | None:
    """``value`` for JSON: rounded, None when absent or not finite (an exact tensor's SQNR)."""
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _write_metadata(model: onnx.ModelProto, config: CompressionConfig, records: list[TensorRecord]) -> None:
    tensors = [
        {"name": r.name, "layer": r.layer, "shape": list(r.shape), "dtype": r.dtype, "bits": r.bits, "groups": r.groups,
         "encoding": r.encoding, "outliers": r.outliers,
         "original_bytes": r.original_bytes, "compressed_bytes": r.compressed_bytes,
         "sqnr_db": _rounded(r.sqnr_db, 2), "layer_error": _rounded(r.layer_error, 6)}
        for r in records if r.bits is not None
    ]
    values = {
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.encoding_settings(), sort_keys=True),
        "tensors": json.dumps(tensors, separators=(",", ":")),
    }
    kept = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=f"{METADATA_PREFIX}{key}", value=value)
